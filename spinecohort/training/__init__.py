"""Training recipes for spinecohort's networks (``spinecohort train <network>``)."""
