"""`cellwatch-node`: run an edge node, classify local files, list OpenVINO devices."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import openvino as ov

from cellwatch.node.classifier import Classifier
from cellwatch.node.config import NodeSettings
from cellwatch.node.decode import ImageError, ImageLimits
from cellwatch.node.engine import EngineConfig, check_device, load_serving_model
from cellwatch.node.faults import Faults
from cellwatch.node.requests import IMAGE_ID_RE, ImageRequest
from cellwatch.node.service import NodeService
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.cli import friendly_errors, run_until_signalled, setup_logging
from cellwatch.shared.schemas import utcnow
from cellwatch.shared.signing import TrustedKeys


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cellwatch edge node: classifies blood-smear images with OpenVINO.

    Research use only: results are not a diagnosis.
    """


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="node.toml (CELLWATCH_* environment variables override it)",
)
@friendly_errors
def run(config_path: Path | None) -> None:
    """Serve images from MQTT until SIGTERM/SIGINT, then stop gracefully."""
    settings = NodeSettings.load(config_path)
    setup_logging(settings.log_level)
    run_until_signalled(NodeService(settings, faults=Faults.from_env()))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--bundle", type=click.Path(path_type=Path), required=True, help="model bundle directory"
)
@click.option(
    "--trusted-keys", type=click.Path(path_type=Path), help="directory of trusted *.pub keys"
)
@click.option("--allow-unsigned", is_flag=True, help="DEVELOPMENT ONLY: accept unsigned bundles")
@click.option("--device", default="CPU", show_default=True, help="OpenVINO device")
@click.option("--force-f32", is_flag=True, help="force f32 inference precision")
@click.option("--node-id", default="local", show_default=True, help="node_id in the Results")
@friendly_errors
def classify(
    images: tuple[Path, ...],
    bundle: Path,
    trusted_keys: Path | None,
    allow_unsigned: bool,
    device: str,
    force_f32: bool,
    node_id: str,
) -> None:
    """Classify local image files; prints one Result JSON per line (no MQTT)."""
    setup_logging("WARNING")
    core = ov.Core()
    check_device(core, device)
    verified = load_bundle(bundle, TrustedKeys.load(trusted_keys), allow_unsigned=allow_unsigned)
    model = load_serving_model(
        core,
        verified,
        EngineConfig(
            device=device, performance_hint="latency", force_f32=force_f32, infer_requests=1
        ),
    )
    classifier = Classifier(node_id, ImageLimits())
    failed = 0
    for path in images:
        try:
            payload = path.read_bytes()
        except OSError as exc:
            click.echo(f"error: cannot read {path}: {exc.strerror}", err=True)
            failed += 1
            continue
        req = ImageRequest(
            payload,
            image_id=path.stem if IMAGE_ID_RE.match(path.stem) else None,
            source=None,
            received_at=utcnow(),
            received_mono=time.monotonic(),
        )
        try:
            x = classifier.prepare(req, model).pixels
            result = classifier.ok_result(req, model, model.infer(x))
        except ImageError as exc:
            result = classifier.error_result(req, exc.code, str(exc), model)
            failed += 1
        click.echo(result.to_json().decode())
    sys.exit(1 if failed else 0)


@main.command()
def devices() -> None:
    """List the OpenVINO devices this machine has."""
    core = ov.Core()
    for name in core.available_devices:
        try:
            full = core.get_property(name, "FULL_DEVICE_NAME")
        except RuntimeError:
            full = ""
        click.echo(f"{name}\t{full}")
