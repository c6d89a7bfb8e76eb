"""Layer 5 — train: the one training loop (student, teacher, objective, parameter set, budget) that
recovery, gates (DDP), the pipeline and the encoders all run on, and the teacher cached once (sparse
logit targets, teacher_cache). Imports the layers below.
"""

from core.train.loop import TrainOptions, train

__all__ = ["TrainOptions", "train"]
