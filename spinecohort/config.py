"""Configuration: defaults, safe YAML loading and JSON-schema validation."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

# Every key's default: the file config/config.yaml (the Snakefile's configfile) links to, so that the
# Snakemake run and the entry points that run without it (``spinecohort predict``) start alike.
DEFAULTS: dict[str, Any] = yaml.safe_load(resources.files("spinecohort").joinpath("defaults.yaml").read_text())


class ConfigError(ValueError):
    pass


def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("spinecohort.schemas").joinpath(f"{name}.schema.yaml").read_text()
    return yaml.safe_load(text)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """Command-line values arrive as text (``--config demo='{seed: 1}'``): give them the schema's type."""
    types = schema.get("type")
    types = [types] if isinstance(types, str) else (types or [])
    if isinstance(value, Mapping) and "properties" in schema:
        return {k: _coerce(v, schema["properties"].get(k, {})) for k, v in value.items()}
    if isinstance(value, str):
        if "integer" in types and value.strip().lstrip("-").isdigit():
            return int(value)
        if "boolean" in types and value.strip().lower() in {"true", "false"}:
            return value.strip().lower() == "true"
        if "null" in types and value.strip().lower() in {"", "null", "none"}:
            return None
    return value


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults + given keys, validated. Raises :class:`ConfigError` naming the bad key."""
    schema = load_schema("config")
    merged = _coerce(_merge(DEFAULTS, config), schema)
    try:
        jsonschema.validate(merged, schema)
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where}: {error.message}") from None
    outdir = Path(merged["outdir"]).expanduser().resolve()
    # Results, work files and logs go under outdir: the file-system root or the home folder itself
    # would scatter them among the user's own files.
    if outdir == Path(outdir.anchor) or outdir == Path.home().resolve():
        raise ConfigError(f"config key outdir: {merged['outdir']!r} is {'the file-system root' if outdir == Path(outdir.anchor) else 'the home folder'}; give a folder of its own, e.g. results")
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"config key outdir: {merged['outdir']!r} exists and is not a folder")
    from .schemes import parse_reading_schemes  # not at the top: schemes reads its defaults here

    try:
        parse_reading_schemes(merged["reading_schemes"])
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    return merged


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    return resolve_config(_merge(raw, overrides or {}))


def demo_paths(config: Mapping[str, Any]) -> dict[str, Path]:
    """Where the demo cohort lives when no manifest is configured."""
    root = Path(config["outdir"]) / "demo"
    return {"root": root, "manifest": root / "manifest.csv", "labels": root / "labels.csv", "truth": root / "truth.parquet"}


def manifest_path(config: Mapping[str, Any]) -> Path:
    return Path(config["manifest"]) if config.get("manifest") else demo_paths(config)["manifest"]


def labels_path(config: Mapping[str, Any]) -> Path | None:
    if config.get("labels"):
        return Path(config["labels"])
    return None if config.get("manifest") else demo_paths(config)["labels"]
