"""Meta-training: tasks, vectorized truncated unrolls, PES/ES/TBPTT estimators and the `MetaTrainer`.

    from optbundle.meta import MetaTrainer, load_recipe
    rule = MetaTrainer(load_recipe("meta-train-default")).train()

or from a shell (also under ``torchrun --nproc_per_node=N``): ``python -m optbundle.meta.train meta-train-default``.
"""

from .estimators import MetaLossConfig, es_gradient, normalized_meta_loss, pes_gradient, tbptt_gradient
from .tasks import CharTransformerLM, MLPClassifier, ModuleTask, Task, build_task, sample_task_spec
from .trainer import MetaTrainConfig, MetaTrainer, load_recipe
from .unroll import TaskGroup, flatten_rule, inner_step, parameter_mask, unflatten_weights

__all__ = [
    "CharTransformerLM",
    "MLPClassifier",
    "MetaLossConfig",
    "MetaTrainConfig",
    "MetaTrainer",
    "ModuleTask",
    "Task",
    "TaskGroup",
    "build_task",
    "es_gradient",
    "flatten_rule",
    "inner_step",
    "load_recipe",
    "normalized_meta_loss",
    "parameter_mask",
    "pes_gradient",
    "sample_task_spec",
    "tbptt_gradient",
    "unflatten_weights",
]
