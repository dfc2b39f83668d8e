"""Synthetic sagittal spine MRI phantoms with exact truth, and simulated radiologist reads.

The phantoms are the demo cohort and training / evaluation data for the vertebra detector,
the level labeller and the disc grader, so:

* geometry is exact: every vertebral body is a rounded quadrilateral whose four corners
  (superior-anterior, superior-posterior, inferior-posterior, inferior-anterior, as
  ``(row, col)`` pixel coordinates) are recorded for every slice it is drawn on; the body
  narrows toward its lateral edges (it is drawn and recorded while ``|dx| < 0.9 W/2``);
  concave endplates and the anterior waist lie inside the polygon, corners are the tips
  of the rounded corners;
* anatomy is level specific: sacrum (one fused bone: S1 and the S2-S5 segments curving
  posteriorly share marrow and an outer cortex, no disc below S1 except, in two thirds of
  subjects, thin remnant lines at S1-S2 and often the junctions below; alae on parasagittal slices), large lumbar bodies, smaller thoracic bodies with rib heads,
  necks and transverse processes on parasagittal slices, small cervical bodies, C2 with the
  dens (fused to the body: no cortex between them), C1 arches, clivus and the posterior
  fossa; discs thin in the thoracic spine and wedge-shaped at L5-S1; the cord ends at
  about L1 (conus, then cauda equina roots);
* every disc carries grades for all tasks in :data:`spinecohort.tasks.TASKS`, drawn from a
  latent degeneration model calibrated to Genodisc-like prevalences over lumbar discs
  (:data:`TARGET_PREVALENCE`), and each grade changes the image: Pfirrmann (nucleus
  signal, size, sharpness, cleft; strong on T2/STIR, subtle on T1), Narrowing (disc height,
  hence the whole chain above), CentralCanalStenosis (hourglass narrowing of the thecal sac
  at the disc level by disc bulge and ligamentum flavum), Spondylolisthesis (anterior slip of
  the upper vertebra and everything above), Upper/LowerEndplateDefect (notch in the
  inferior endplate of the upper / superior endplate of the lower vertebra, within 5 mm of
  the midline), Upper/LowerMarrow (Modic type 1/2/3 band next to that endplate), Herniation
  (focal posterior protrusion into the canal near the midline), ForaminalStenosisLeft/Right
  (fat of that foramen replaced by disc/ligament on the left = higher slice indices / right
  parasagittal slices).  Grades are given for every disc (thoracic and cervical too, with
  lower degeneration), although only T12-L1 .. L5-S1 are meant to be graded.

Conventions.  Volume axes ``(slices, rows, cols)``; rows run superior -> inferior, cols
anterior -> posterior, slices right -> left (increasing DICOM patient x in LPS); slice
spacing equals the thickness.  Internally all geometry is in millimetres with pixel
``(i, j)`` centred at ``(i * spacing, j * spacing)``; slice ``k`` lies at lateral position
``(k - midline_slice) * thickness + offset`` mm (positive = patient left, offset within
+-0.3 thickness), so ``midline_slice`` (``n_slices // 2``) passes through the cord.
Truth lists the 24 levels S1 .. C2 only (the fused S2-S5 segments are drawn, not listed);
the C2 polygon is the body without the dens.  Vertebrae whose body is cut by the image
border have ``partial=True`` (their polygons may leave the image); discs are listed for
each pair of consecutive listed vertebrae and are ``partial`` when either is.
A lumbar series ends below the sacrum's top, or (30 %, tightly framed) anywhere between the
lower part of L5 and just below S1.  Whole-spine series are rectangular (``cols`` about 0.55 * ``rows``) at 0.9-1.2 mm; the
subject is scaled down when C2..S3 would not fit in ``rows * 1.2`` mm.

Image formation: tissue maps painted per slice (soft tissue on a ~1.5-2 mm grid, spine on
the image grid with anti-aliased edges and through-slice partial volume for thin
structures), 3-tap partial-volume blur, posterior receive-coil bias with a smooth random
modulation, 12-bit scaling and Rician-like noise.  Everything is drawn from
``numpy.random.default_rng(seed)`` (the calibration of the grade thresholds uses its own
fixed generator once per process); there is no global random state.
"""
# Imports point one way: scene uses anatomy, degeneration, canvas and truth; only generate
# (and this file) import scene; reads stands alone.
from .degeneration import TARGET_PREVALENCE
from .generate import draw_protocol, generate_scan
from .reads import simulate_reads
from .truth import SyntheticDisc, SyntheticScan, SyntheticVertebra, truth_frame
# private names that tests import (syn._X)
from .anatomy import _DISC  # noqa: F401
from .degeneration import _draw_age, _draw_grades  # noqa: F401
from .generate import _protocol_draws  # noqa: F401
from .scene import _Scene  # noqa: F401

__all__ = [
    "SyntheticVertebra",
    "SyntheticDisc",
    "SyntheticScan",
    "generate_scan",
    "draw_protocol",
    "simulate_reads",
    "truth_frame",
    "TARGET_PREVALENCE",
]
