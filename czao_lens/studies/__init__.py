"""Studies: the CZAO paper's open problems turned into runnable experiments (docs/findings.md).

Each study writes a JSON table and a plotly figure; ``quick`` is a harness check for CI. They sit
above the bench (they read its outputs and reuse its pieces) and below the CLI.
"""

from czao_lens.studies.common import StudyError, StudyResult, StudySettings
from czao_lens.studies.registry import STUDIES, Study, get_study, run_study

__all__ = ["STUDIES", "Study", "StudyError", "StudyResult", "StudySettings", "get_study", "run_study"]
