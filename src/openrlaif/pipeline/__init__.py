"""The end-to-end pipeline: one YAML file, one command, resumable stage by stage.

config.py (what a run is), stages.py (what each stage does and reads), manifest.py (what was
done, fingerprinted), run.py (the loop that skips, resumes or re-runs each stage).
"""

from openrlaif.pipeline.config import PipelineConfig, load_pipeline_config
from openrlaif.pipeline.run import RunResult, run_pipeline

__all__ = ["PipelineConfig", "RunResult", "load_pipeline_config", "run_pipeline"]
