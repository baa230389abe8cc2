"""Training: TF-Slim Inception V3 transfer learning -> frozen graph -> OpenVINO IR -> bundle.

Research use only, not for diagnosis. The pipeline (`cellwatch-train`):
`synth` / `prepare` -> `fit` -> `evaluate` -> `export`; see training/README.md.
Modules that need TensorFlow import it through `cellwatch.training.tfcompat`, so the
package itself (and `cellwatch-train --help`) imports quickly without it.
"""

from cellwatch.shared.manifest import PreprocessingSpec

LABELS: tuple[str, str] = ("normal", "ALL")
"""Class index order everywhere: 0 = normal (file suffix _0), 1 = ALL blast (suffix _1)."""

IMAGE_SIZE: int = PreprocessingSpec().size
"""Network input side (299): the bundle contract's preprocessing size."""

__all__ = ["IMAGE_SIZE", "LABELS"]
