"""``edgedx bench``: float vs compressed models, clinical and device figures, against device budgets."""

from ._bench import bench, export_kit, import_results
from ._report import BenchResult

__all__ = ["BenchResult", "bench", "export_kit", "import_results"]
