"""DtR (Distill-then-Replace) as a plain library: turn a full-attention transformer into a
task-specific hybrid with linear attention where the target task does not need softmax attention.

``run.run_dtr`` is the one sequence of stages (``stages.py`` says what each computes); a
``runner.StageRunner`` executes them: plain calls for ``python -m dtr_core``, Prefect tasks for the
flow (``tasks/runner.py``). No orchestration imports (prefect, mlflow, hydra) belong in this package.
"""

__version__ = "0.1.0"
