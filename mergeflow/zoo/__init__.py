"""The offline model zoo: a small homologous Llama family (base + one expert per task) with lm-eval task files.

No machine here can download a model or a data set, so mergeflow builds its own: a word-level tokenizer, nine
synthetic FLAN-like tasks (six in-domain, three out-of-domain), a base pre-trained on a generic mixture and experts
fully fine-tuned from it. See ``build_zoo`` and ``Zoo``.
"""

from mergeflow.zoo.build import SIZES, Zoo, build_zoo, default_zoo_dir
from mergeflow.zoo.tasks import TASKS

__all__ = ["SIZES", "TASKS", "Zoo", "build_zoo", "default_zoo_dir"]
