"""DtR (Distill-then-Replace) as a plain library: turn a full-attention transformer into a
task-specific hybrid with linear attention where the target task does not need softmax attention.

Stages (each a function the pipeline can call and cache): ``pipeline.capture_stage``,
``pipeline.distill_stage``, ``pipeline.search_stage``, ``export.export_hybrid``; ``pipeline.run_dtr``
runs them in order. No orchestration imports (prefect, mlflow, hydra) belong in this package.
"""

__version__ = "0.1.0"
