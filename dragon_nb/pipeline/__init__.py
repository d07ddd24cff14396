"""Streaming pipelines whose stages pass items worker to worker."""
from dragon_nb.errors import PipelineError
from dragon_nb.pipeline.pipeline import Pipeline, Stage, on_node, stage

__all__ = ["Pipeline", "PipelineError", "Stage", "on_node", "stage"]
