"""Steps 3 and 7a: `cellwatch-train` as a person runs it (synth, prepare, fit,
evaluate, export), and what the bundle says of the model it ships. Version 2 trains on
its own split: the data set and the field samples' training half (`prepare --field`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from cellwatch.shared.figures import BundleMetrics, MetricSet, Proportion
from cellwatch.shared.manifest import Manifest
from cellwatch.training.errors import GateError
from cellwatch.training.stats import fmt, wilson
from demolib.common import MODEL_NAME, DemoError, Layout, Profile, console, doing, done, shown
from demolib.processes import Command, ProcessGroup, tail
from demolib.services import cw
from demolib.summary import TrainedInfo

FALLBACK = {"int8": "fp16", "fp16": "fp32"}
"""The precision the demo ships when the export gate refuses one: a model whose
probabilities sit near its threshold (a random base, one epoch) can flip a decision
even in fp16 (bf16 on CPUs that have it)."""
GATE_EXIT_CODE = GateError.exit_code
"""`cellwatch-train export`: the deployed model fails the export gate."""
ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
ACCURATE_INT8 = "make demo INT8=accurate"
"""The command that runs what the default demo skips (NNCF's accuracy-aware int8)."""


def gate_message(log: Path) -> str:
    """The gate's one-line refusal from an export's log (its last `error:` line)."""
    lines = [line.strip() for line in tail(log, 40).splitlines() if "error:" in line]
    return lines[-1].split("error:", 1)[1].strip() if lines else "it failed the export gate"


@dataclass
class Trained:
    tag: str
    version: str
    run: Path
    bundle: Path
    precision: str
    """The precision shipped (fp16 when int8 failed the export gate)."""
    manifest: Manifest
    fallback: str | None = None
    """Why the demo shipped another precision than the profile's, if it did."""

    @property
    def figures(self) -> BundleMetrics:
        """The bundle's figures, as `cellwatch-train export` writes them."""
        figures = self.manifest.figures
        if figures is None:
            raise DemoError(f"{shown(self.bundle)}: its manifest has no cellwatch figures")
        return figures

    @property
    def deployed(self) -> MetricSet:
        """The figures of the model the nodes run (its own, on the test split)."""
        return self.figures.deployed.metrics

    @property
    def tensorflow(self) -> MetricSet:
        return self.figures.tensorflow.metrics

    @property
    def agreement(self) -> Proportion:
        return self.figures.agreement

    @property
    def flags(self) -> list[str]:
        return list(self.manifest.flags)

    def info(self) -> TrainedInfo:
        return TrainedInfo(
            version=self.version,
            precision=self.precision,
            fallback=self.fallback,
            flags=self.flags,
            metrics=self.figures.model_dump(mode="json"),
        )


class Training:
    """`cellwatch-train` in the demo's working directory."""

    def __init__(
        self, group: ProcessGroup, layout: Layout, profile: Profile, checkpoint: Path | None
    ) -> None:
        self.group = group
        self.layout = layout
        self.profile = profile
        self.checkpoint = checkpoint

    def make_data(self) -> None:
        """A SYNTHETIC data set and its train/val/test split."""
        data, split = self.layout.data, self.layout.split
        synth = cw("train", "synth", data, "--count", self.profile.images, "--force")
        self.group.run("train-synth", synth)
        self.group.run("train-prepare", cw("train", "prepare", data, "--out", split, "--force"))

    def prepare_with(self, field: Path) -> Path:
        """Version 2's split: the data set split as before, and the labelled field
        samples of `field` (with their near-copies in the data set) all in training."""
        split = self.layout.split_v2
        doing(
            f"a new split with the field samples of {shown(field)}/ in training "
            "(--field-into train: they all come from one lab account, which `prepare` "
            "would otherwise keep together in one split); the held-out half measures "
            "both versions below"
        )
        argv = cw("train", "prepare", self.layout.data, "--field", field, "--out", split)
        self.group.run("train-prepare-v2", [*argv, "--field-into", "train", "--force"])
        placed = self.field_placement()
        if placed["train"] != sum(placed.values()):
            raise DemoError(f"prepare --field-into train put field samples elsewhere: {placed}")
        return split

    def field_placement(self) -> dict[str, int]:
        """Where `prepare --field` put version 2's field samples: split name -> count."""
        from cellwatch.training.field import is_field_entry
        from cellwatch.training.split import load_split
        from cellwatch.training.stratify import SPLIT_NAMES

        split = load_split(self.layout.split_v2)
        return {
            name: sum(is_field_entry(e, split.field) for e in split.entries(name))
            for name in SPLIT_NAMES
        }

    def train(
        self,
        tag: str,
        version: str,
        epochs: int,
        int8_method: str = "ptq",
        after: Trained | None = None,
        field: Path | None = None,
    ) -> Trained:
        """fit (bottleneck) -> evaluate -> export a signed bundle. after: the version
        before this one, whose shipped precision this one starts from. field: labelled
        field samples that join the data set in this version's own split."""
        run, bundle = self.layout.run_dir(tag), self.layout.bundle(tag)
        split = self.layout.split if field is None else self.prepare_with(field)
        run.parent.mkdir(parents=True, exist_ok=True)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        base = ["--checkpoint", self.checkpoint] if self.checkpoint is not None else []
        doing(
            f"training {MODEL_NAME} {version}: up to {epochs} epoch(s) of a new 2-class head on "
            "Inception V3 features (bottleneck mode: the base network runs once per image, and "
            "its features are cached for the next run); the epoch with the lowest validation "
            "loss is kept"
        )
        fit = cw("train", "fit", split, "--out", run, "--epochs", epochs, *base)
        fit += ["--cache", str(self.layout.bottlenecks)]
        self.group.run(f"train-fit-{tag}", [*fit, "--mode", "bottleneck", "--force"], env=ENV)
        doing("evaluating on the held-out test images (never seen in training), with 95% intervals")
        self.group.run(f"train-evaluate-{tag}", cw("train", "evaluate", run), env=ENV)
        return self.export(tag, version, run, bundle, int8_method, after)

    def export(
        self,
        tag: str,
        version: str,
        run: Path,
        bundle: Path,
        int8_method: str,
        after: Trained | None,
    ) -> Trained:
        precision = self.profile.precision
        if after is not None and after.fallback is not None and int8_method == "ptq":
            doing(
                f"{precision} is skipped for {version}: the export gate refused plain "
                f"quantisation for {after.version} (above), so {version} ships {after.precision} "
                "as it did; the same gate checks it"
            )
            precision = after.precision
        doing(
            f"exporting: calibrate on the validation images, frozen graph -> OpenVINO IR "
            f"({precision}) -> the IR itself measured on the test images -> export gate -> "
            "signed bundle with a model card"
        )
        untrained = [] if self.checkpoint is not None else ["--allow-untrained"]
        if untrained:
            doing(
                "--allow-untrained: without CHECKPOINT the base network is random, so export "
                "would refuse it; the bundle is labelled UNTRAINED wherever it goes"
            )
        else:
            untrained = ["--base-is", f"the checkpoint given as CHECKPOINT ({self.checkpoint})"]
            doing(
                "--base-is: export checks the checkpoint's SHA-256 against the published "
                "TF-Slim file's; one it cannot verify is exported only with what you say it "
                "is, and labelled UNVERIFIED-BASE wherever it goes"
            )
        if self.profile.allow_no_skill:
            untrained.append("--allow-no-skill")
            doing(
                f"--allow-no-skill: {self.profile.images} images leave too few test images "
                "to show skill, so export would refuse the model; the bundle is labelled "
                "NO-SKILL wherever it goes"
            )
        if precision == "int8":
            if int8_method == "auto":
                doing(
                    "int8: NNCF's accuracy-aware quantisation if plain quantisation misses the "
                    "gate (several minutes; progress below)"
                )
            else:
                doing(
                    "int8: plain quantisation (--int8-method ptq); if the gate refuses it the "
                    "demo ships fp16. Skipped to keep the demo short: NNCF's accuracy-aware "
                    f"search (2-6 minutes on a fast CPU, more on a slow one); `{ACCURATE_INT8}` "
                    "runs it"
                )

        def export(prec: str) -> Command:
            argv = cw("train", "export", run, "--out", bundle, "--name", MODEL_NAME)
            argv += ["--version", version, "--precision", prec, *untrained]
            if prec == "int8":
                argv += ["--int8-method", int8_method]
            argv += ["--sign-key", str(self.layout.sign_key), "--force"]
            return self.group.spawn(f"train-export-{tag}-{prec}", argv, env=ENV)

        attempt = export(precision)
        self.group.finish(attempt, check=False)
        fallback = None
        code = attempt.child.proc.returncode
        while code == GATE_EXIT_CODE and precision in FALLBACK:
            fallback = gate_message(attempt.child.log)
            console.print(
                f"  [yellow]![/yellow] {precision} is NOT shipped: {escape(fallback)}. The demo "
                f"ships {FALLBACK[precision]} instead, whose decisions the same gate checks."
            )
            precision = FALLBACK[precision]
            attempt = export(precision)
            self.group.finish(attempt, check=False)
            code = attempt.child.proc.returncode
        if code != 0:
            self.group.finish(attempt)  # raises with the end of its log
        manifest = Manifest.model_validate_json((bundle / "manifest.json").read_bytes())
        return Trained(tag, version, run, bundle, precision, manifest, fallback)


def report(t: Trained) -> None:
    """The deployed model's own figures (from its manifest), TensorFlow's beside them."""
    m = t.manifest
    dep, tf = t.deployed, t.tensorflow
    flags = ", ".join(f.upper() for f in t.flags)
    done(
        f"{MODEL_NAME} {t.version} ({t.precision}{', ' + flags if flags else ''}): bundle "
        f"{shown(t.bundle)}, model card {shown(t.bundle / 'MODEL_CARD.md')}"
    )
    table = Table(
        title=f"{MODEL_NAME} {t.version} on {t.figures.n} held-out test images "
        f"(SYNTHETIC; threshold p(ALL) >= {dep.threshold:.3f}; 95% intervals)"
    )
    for col in ("figure", f"deployed {t.precision} IR (what the nodes run)", "TensorFlow"):
        table.add_column(col)
    for label, key in (
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("ROC AUC", "roc_auc"),
    ):
        table.add_row(label, fmt(getattr(dep, key)), fmt(getattr(tf, key)))
    console.print(table)
    figures, gate = t.figures, m.provenance.gate
    if gate is not None:
        every = figures.agreement_all
        done(
            f"deployed decisions equal TensorFlow's on {fmt(t.agreement, 3)} of the test images"
            + (f" and {fmt(every, 3)} of every image" if every is not None else "")
            + f"; export gate (agreement >= {num(gate.min_agreement)}, sensitivity drop <= "
            f"{num(gate.max_sensitivity_drop)}, |p difference| <= "
            f"{num(gate.max_prob_diff_limit)}) {'passed' if gate.passed else 'FAILED'}; "
            f"measured on {figures.deployed.device} at {figures.deployed.inference_precision}"
        )
    quantization = m.provenance.quantization
    for attempt in quantization.attempts if quantization is not None else []:
        if attempt.agreement_k is None or attempt.n is None:
            continue
        done(
            f"int8 by {attempt.method} ({attempt.seconds or 0:.0f} s): decisions equal "
            f"TensorFlow's on {fmt(wilson(attempt.agreement_k, attempt.n))}: "
            + ("passes the gate" if attempt.passed else "refused by the gate")
        )
    quality = m.provenance.quality
    if quality is not None:
        figures_text = (
            f"ROC AUC's lower bound {num(quality.auc_ci_low)}, Brier {num(quality.brier)} "
            f"against the prior's {num(quality.prior_brier)}"
        )
        if quality.passed:
            done(f"evidence of skill on {quality.n} test images: {figures_text}")
        else:
            console.print(
                f"  [yellow]![/yellow] NO evidence of skill on {quality.n} test images "
                f"({escape(figures_text)}): exported only because of --allow-no-skill"
            )
    c, d = m.calibration, m.decision
    if c is not None and d is not None:
        applied = f"temperature {c.temperature:.3g} applied" if c.applied else "not applied"
        note = (c.note or "").removeprefix("not applied: ")
        done(
            f"calibration on {c.n} validation images: {applied}"
            + (f" ({note})" if note and not c.applied else "")
            + f"; low-confidence band p(ALL) in [{d.low_confidence[0]:.2f}, "
            f"{d.low_confidence[1]:.2f}]"
        )
        if c.test is not None:
            done(
                f"on the {c.test.n} test images: ECE {c.test.ece:.3f}, NLL {c.test.nll:.3f}, "
                f"Brier {c.test.brier:.3f}; {c.test.errors_in_band} of its {c.test.errors} "
                "errors fall inside the low-confidence band"
            )


def num(value: float | None) -> str:
    return f"{value:.3g}" if value is not None else "?"
