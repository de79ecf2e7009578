"""Evaluation through the real lm-eval harness, over an in-memory model, offline.

Zoo tasks are addressed by short name (``topic``), by lm-eval name (``zoo_topic``) or as groups (``zoo`` = the
in-domain tasks, ``zoo-ood`` = the out-of-domain ones). Their task configs are read from the zoo's YAML files and
given absolute data paths at run time, so a zoo folder works wherever it lies and whatever the working directory.
Any other name (``hellaswag``, ``mmlu``, …) goes to lm-eval's own task registry unchanged, for users who have the
data.

Zoo task files are code as much as data: lm-eval imports the Python a task YAML names with ``!function``, merges
the files it names with ``include:`` and renders its Jinja templates unsandboxed. So a zoo folder a recipe or a
command line names is held to a policy (:func:`check_task_code`) before lm-eval reads anything from it:

* a zoo under ``MERGEFLOW_HOME/zoo`` (where ``mergeflow zoo build`` and ``zoo:`` references put them) is trusted as
  data: its task files are read with a safe YAML loader, and one that uses ``!function`` or ``include:`` is refused;
* a zoo folder anywhere else is accepted only when its task files are exactly the ones mergeflow writes (data paths
  and field names, nothing lm-eval would run), so ``mergeflow zoo build OUT`` still works anywhere;
* anything else needs an explicit opt-in, ``mergeflow eval --trust-task-code`` or ``evaluation.trust_task_code:
  true`` in a recipe (named after Hugging Face's ``trust_remote_code``); lm-eval then loads the task files itself;
* even trusted, a task file may not reach outside its zoo folder: a ``!function`` whose module is not a ``.py`` file
  inside the folder (lm-eval would otherwise import any installed module, ``os.system`` included), an ``include:``
  or a task file that resolves (symlinks followed) outside it is refused.

Evaluating many merges should be cheap: the lm-eval task objects (with their loaded datasets) are built once per
process and zoo, and reused for every model; only the requests are rebuilt.

lm-eval is imported inside the functions that use it: it is an optional dependency (the ``eval`` extra), it takes
seconds to import, and ``datasets`` reads the offline settings of :func:`offline_env` when it is first imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from transformers import AutoTokenizer

from mergeflow.errors import EvaluationError, TaskCodeError, ZooError
from mergeflow.paths import mergeflow_home
from mergeflow.transformers_io import load_causal_lm
from mergeflow.zoo.build import GROUP_IN_DOMAIN, GROUP_OOD, LM_EVAL_PREFIX, Zoo, default_zoo_dir, task_yaml
from mergeflow.zoo.tasks import SPLITS as ZOO_SPLITS
from mergeflow.zoo.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SPLITS = ("test", "validation")
_FEWSHOT_SEED = 1234  # simple_evaluate's default


@dataclass(frozen=True)
class TaskScore:
    """Accuracy and its standard error in percent, over ``n`` examples."""

    acc: float
    stderr: float
    n: int


@dataclass
class EvalResult:
    """Per-task scores keyed by the name the caller used (zoo short names for zoo tasks), plus group means."""

    scores: dict[str, TaskScore]
    groups: dict[str, float]  # unweighted mean accuracy of each requested zoo group
    split: str
    limit: int | None
    raw: dict[str, Any] = field(repr=False)  # lm-eval's results dict (results, configs, n-samples, versions)

    @property
    def accuracy(self) -> dict[str, float]:
        return {name: s.acc for name, s in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "limit": self.limit,
            "scores": {name: {"acc": s.acc, "stderr": s.stderr, "n": s.n} for name, s in self.scores.items()},
            "groups": self.groups,
        }


# ----------------------------------------------------------------------------------------------- task resolution


@dataclass(frozen=True)
class _Plan:
    zoo_tasks: tuple[str, ...]  # short names, in request order
    other_tasks: tuple[str, ...]  # lm-eval names
    groups: dict[str, tuple[str, ...]]  # requested zoo groups -> their short names


def split_task_names(tasks: str | Iterable[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` as a list of task names; none at all is an error."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise EvaluationError("no evaluation task given")
    return names


def _looks_like_zoo_name(name: str) -> bool:
    return name in (GROUP_IN_DOMAIN, GROUP_OOD) or name in TASKS or name.removeprefix(LM_EVAL_PREFIX) in TASKS


def _plan(names: Sequence[str], zoo: Zoo | None) -> _Plan:
    zoo_tasks: list[str] = []
    other: list[str] = []
    groups: dict[str, tuple[str, ...]] = {}

    def add(task: str) -> None:
        if task not in zoo_tasks:
            zoo_tasks.append(task)

    for name in names:
        if not _looks_like_zoo_name(name):
            if name not in other:
                other.append(name)
            continue
        if zoo is None:
            raise EvaluationError(f"task {name!r} is a zoo task but no zoo is given or built")
        if name == GROUP_IN_DOMAIN:
            groups[name] = zoo.in_domain
            for t in zoo.in_domain:
                add(t)
        elif name == GROUP_OOD:
            groups[name] = zoo.ood
            for t in zoo.ood:
                add(t)
        else:
            short = name.removeprefix(LM_EVAL_PREFIX)
            if short not in zoo.tasks:
                raise EvaluationError(
                    f"task {short!r} is not in the {zoo.size} zoo at {zoo.root}; its tasks: {', '.join(zoo.tasks)}"
                )
            add(short)
    return _Plan(tuple(zoo_tasks), tuple(other), groups)


def zoo_tasks(names: Sequence[str], zoo: Zoo) -> tuple[str, ...]:
    """The short names of the zoo tasks ``names`` ask for (groups expanded), in request order."""
    return _plan(names, zoo).zoo_tasks


def resolve_zoo(zoo: Zoo | str | Path | None, names: Sequence[str]) -> Zoo | None:
    """The zoo ``names`` refer to: ``zoo`` itself or loaded from its folder, else the default built zoo if any name
    is a zoo task (None if none is)."""
    if isinstance(zoo, Zoo):
        return zoo
    if zoo is not None:
        try:
            return Zoo.load(zoo)
        except ZooError as e:
            raise EvaluationError(str(e)) from None
    if not any(_looks_like_zoo_name(n) for n in names):
        return None
    default = default_zoo_dir("full", 0)
    if (default / "zoo.json").exists():
        return Zoo.load(default)
    raise EvaluationError(
        f"zoo tasks requested but no zoo given and none at {default}; build one with `mergeflow zoo build` "
        "or pass the zoo (--zoo DIR)"
    )


# ----------------------------------------------------------------------------------------------- task code

TRUST_HINT = ("pass --trust-task-code (mergeflow eval) or set evaluation.trust_task_code: true (recipe) if you "
              "trust that folder's code")


def trusted_zoo_dir() -> Path:
    """Where zoos count as mergeflow's own: ``MERGEFLOW_HOME/zoo`` (``mergeflow zoo build``, ``zoo:`` references),
    resolved like the zoo roots it is compared with, so a ``zoo`` folder that links to another disk stays trusted."""
    return (mergeflow_home() / "zoo").resolve()


@dataclass(frozen=True)
class _TaskFile:
    path: Path
    config: dict[str, Any]  # as a safe loader reads it (``!function`` values as their spec string)
    code: tuple[str, ...]  # what lm-eval would run or read besides the file: "!function utils.f", "include: x"


def _scan_task_file(path: Path, root: Path, seen: frozenset[Path] = frozenset()) -> _TaskFile:
    """Read a task file as data, noting its ``!function`` tags and ``include:`` entries (followed recursively);
    refuse one whose file, function modules or includes resolve outside ``root``."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise TaskCodeError(f"zoo task file {path} resolves outside its zoo folder {root} (to {real})")
    if real in seen:
        raise TaskCodeError(f"zoo task file {path} includes itself")
    functions: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> str:
        spec = str(loader.construct_scalar(node))  # type: ignore[arg-type]
        functions.append(spec)
        return f"!function {spec}"

    Loader.add_constructor("!function", function)
    try:
        cfg = yaml.load(real.read_text(), Loader=Loader)  # a SafeLoader plus a recording constructor
    except OSError as e:
        raise EvaluationError(f"cannot read zoo task file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TaskCodeError(f"zoo task file {path} is not plain YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise EvaluationError(f"zoo task file {path} is not a task config (a YAML mapping)")
    code: list[str] = []
    for spec in functions:
        module, _, _ = spec.rpartition(".")
        # lm-eval imports <folder of the YAML>/<module>.py if it exists, else any importable module of that name
        file = (real.parent / f"{module.replace('.', '/')}.py").resolve() if module else None
        if file is None or not file.is_file() or not file.is_relative_to(root):
            where = f"{file} is not inside the zoo folder {root}" if file is not None else "no module named"
            raise TaskCodeError(f"zoo task file {path}: '!function {spec}' would import code from outside the zoo "
                                f"folder ({where}); only modules beside the task files may be named")
        code.append(f"!function {spec}")
    includes = cfg.get("include")
    for inc in [] if includes is None else includes if isinstance(includes, list) else [includes]:
        target = Path(str(inc)).expanduser()
        target = target if target.is_absolute() else real.parent / target
        if not target.resolve().is_relative_to(root):
            raise TaskCodeError(f"zoo task file {path}: 'include: {inc}' resolves outside the zoo folder {root} "
                                f"(to {target.resolve()})")
        if not target.is_file():
            raise EvaluationError(f"zoo task file {path}: 'include: {inc}' does not exist ({target})")
        code += [f"include: {inc}", *_scan_task_file(target, root, seen | {real}).code]
    return _TaskFile(path, cfg, tuple(code))


def check_task_code(zoo: Zoo, tasks: Iterable[str], *, trust_task_code: bool = False) -> None:
    """Whether lm-eval may load the task files of ``tasks`` (short names) from ``zoo``; raises TaskCodeError with
    one line when not. See the module's docstring for the policy."""
    root = zoo.root.resolve()
    home = trusted_zoo_dir()
    for task in tasks:
        path = zoo.tasks_dir / f"{LM_EVAL_PREFIX}{task}.yaml"
        if not path.exists() and not path.is_symlink():
            continue  # zoo_task_config says it is missing
        scanned = _scan_task_file(path, root)
        if trust_task_code:
            continue
        if scanned.code:
            raise TaskCodeError(f"zoo task file {path} runs code ({', '.join(scanned.code)}); {TRUST_HINT}")
        if not root.is_relative_to(home) and scanned.config != task_yaml(task, {s: f"{task}/{s}.jsonl"
                                                                                for s in ZOO_SPLITS}):
            raise TaskCodeError(f"zoo {root} lies outside {home} and its task file {path.name} is not one mergeflow "
                                f"writes (lm-eval would run what it says); {TRUST_HINT}")


def task_code_identity(zoo: Zoo) -> str:
    """A digest of the code a trusted zoo's task files may run (every ``.yaml`` and ``.py`` file in the zoo folder,
    where their includes and modules must lie): evaluations with trusted task code are cached under it, so edited
    task code is scored again."""
    digest = hashlib.sha256()
    for path in sorted(p for p in zoo.root.rglob("*") if p.suffix in (".yaml", ".yml", ".py") and p.is_file()):
        digest.update(f"{path.relative_to(zoo.root).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------------------------- lm-eval objects

# lm-eval's task objects (cached below) hold the requests of the evaluation in progress: an evaluation locks the
# objects it uses (their keys, in sorted order), so evaluations of other splits, zoos or tasks run at the same time
# in the threads of a task runner (the reported and the selection split of one merge do), and two evaluations of
# the same tasks take turns. torch's thread count and lm-eval's logging are process-wide: see _SharedSettings.
_TASK_MANAGERS: dict[str, Any] = {}
_TASK_OBJECTS: dict[tuple[str, str, str, str, int], Any] = {}
_TASK_LOCKS: dict[tuple[str, str, str, str, int], threading.Lock] = {}
_REGISTRY_LOCK = threading.RLock()  # guards the three dicts above


def offline_env() -> None:
    """Keep lm-eval's hub and datasets lookups offline unless the user said otherwise."""
    # datasets reads these at import; set them before lm-eval imports it (a user's explicit setting wins).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_manager(include_path: Path | None) -> Any:
    """A TaskManager over the task files under ``include_path`` only (indexing lm-eval's built-ins costs 10–16 s),
    or the default one over lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    key = str(include_path) if include_path else ""
    with _REGISTRY_LOCK:
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = (
                TaskManager(include_path=str(include_path), include_defaults=False) if include_path else TaskManager()
            )
        return _TASK_MANAGERS[key]


def _inline_task_manager() -> Any:
    """A TaskManager that indexes no folder: zoo tasks are given to it as configs (see zoo_task_config), so lm-eval
    never walks a zoo folder (and the includes of its files) on its own."""
    from lm_eval.tasks import TaskManager

    with _REGISTRY_LOCK:
        if "<inline>" not in _TASK_MANAGERS:
            _TASK_MANAGERS["<inline>"] = TaskManager(include_defaults=False)
        return _TASK_MANAGERS["<inline>"]


def _load_task_code(path: Path) -> dict[str, Any]:
    """A trusted task file as lm-eval loads it: ``!function`` imported, ``include:`` merged."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config

        return dict(load_yaml_config(yaml_path=str(path), mode="full"))
    return dict(load_yaml(path, resolve_func=True, recursive=True))


def zoo_task_config(zoo: Zoo, task: str, split: str = "test", *, trust_task_code: bool = False) -> dict[str, Any]:
    """The zoo task's lm-eval config with absolute data paths, evaluating on ``split`` (test or validation).

    The task file is held to :func:`check_task_code` first; it is read as data (a safe YAML loader) unless
    ``trust_task_code``, when lm-eval's loader reads it (importing its ``!function`` code, merging its includes)."""
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    check_task_code(zoo, [task], trust_task_code=trust_task_code)
    path = zoo.tasks_dir / f"{LM_EVAL_PREFIX}{task}.yaml"
    try:
        cfg = _load_task_code(path) if trust_task_code else yaml.safe_load(path.read_text())
    except OSError as e:
        raise EvaluationError(f"zoo task file missing: {path} ({e.strerror})") from None
    files = {s: str(zoo.data_file(task, s)) for s in (split, "fewshot")}
    for p in files.values():
        if not Path(p).exists():
            raise EvaluationError(f"zoo data file missing: {p}")
    cfg["dataset_kwargs"] = {**cfg.get("dataset_kwargs", {}), "data_files": files}
    # Load only the split evaluated and the few-shot pool: the 12 800-row train split is not needed here.
    for key in ("training_split", "validation_split", "test_split"):
        cfg.pop(key, None)
    cfg["test_split" if split == "test" else "validation_split"] = split
    return cfg


def _zoo_task_objects(zoo: Zoo, tasks: Sequence[str], split: str, num_fewshot: int,
                      trust_task_code: bool = False) -> list[Any]:
    # Keyed by the data's hash too, so a zoo rebuilt in place is never scored with stale datasets.
    def key(task: str) -> tuple[str, str, str, str, int]:
        sha = zoo.manifest.get("task_info", {}).get(task, {}).get("splits", {}).get(split, {}).get("sha256", "")
        return (str(zoo.root), task, split, sha, num_fewshot)

    check_task_code(zoo, tasks, trust_task_code=trust_task_code)  # also before reusing a task object
    with _REGISTRY_LOCK:
        missing = [t for t in tasks if key(t) not in _TASK_OBJECTS]
        if missing:
            tm = _inline_task_manager()
            configs = [zoo_task_config(zoo, t, split, trust_task_code=trust_task_code) for t in missing]
            loaded = tm.load(configs)["tasks"]
            for t in missing:
                obj = loaded[LM_EVAL_PREFIX + t]
                obj.set_config(key="num_fewshot", value=num_fewshot)
                _TASK_OBJECTS[key(t)] = obj
                _TASK_LOCKS[key(t)] = threading.Lock()
        return [(_TASK_OBJECTS[key(t)], _TASK_LOCKS[key(t)]) for t in tasks]


@contextlib.contextmanager
def _holding(locks: Iterable[threading.Lock]) -> Iterator[None]:
    """Hold ``locks`` (acquired in one global order, by id, so that two evaluations never wait on each other)."""
    held: list[threading.Lock] = []
    try:
        for lock in sorted(set(locks), key=id):
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


class _SharedSettings:
    """Process-wide settings of the evaluations in progress: torch's CPU thread count and lm-eval's silenced
    loggers and progress bars. The first evaluation to enter applies them and the last to leave restores them;
    an evaluation that wants another thread count than the running ones waits until they are done (two
    evaluations on one thread each share the process: one core each)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._threads: int | None = None
        self._restore: Any = None

    @contextlib.contextmanager
    def applied(self, threads: int | None) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0 or self._threads == threads)
            if self._active == 0:
                self._threads = threads
                self._restore = contextlib.ExitStack()
                self._restore.enter_context(_torch_threads(threads))
                self._restore.enter_context(_quiet_lm_eval())
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._restore.close()
                    self._restore = None
                    self._cond.notify_all()


_SETTINGS = _SharedSettings()


def _other_task_objects(names: Sequence[str], known_zoo: Iterable[str]) -> list[Any]:
    tm = task_manager(None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise EvaluationError(
            f"unknown evaluation task(s) {', '.join(unknown)}: neither a zoo task ({', '.join(known_zoo)}, "
            f"groups {GROUP_IN_DOMAIN}, {GROUP_OOD}) nor an lm-eval task"
        )
    return list(tm.load(list(names))["tasks"].values())


# ----------------------------------------------------------------------------------------------- evaluate

_LM_CLASS: Any = None


def _lm_class() -> Any:
    """lm-eval's HFLM, tokenizing a whole evaluation's requests in one batched call.

    HFLM encodes every (context, continuation) pair with two single-string tokenizer calls; for a zoo-sized model
    that costs three times the scoring itself. The subclass encodes the same strings, with the same special-token
    arguments, in one batch up front and serves ``tok_encode`` from it; scoring is lm-eval's own.
    """
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    class BatchTokenizingHFLM(HFLM):
        _encoded: dict[str, list[int]]

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            strings: set[str] = set()
            for req in requests:
                context, continuation = req.args
                if context:  # lm-eval's _encode_pair encodes context + continuation and the right-stripped context
                    strings.update((context + continuation, context.rstrip()))
            bos = self.tokenizer.decode(self.prefix_token_id)
            plain = sorted(x for x in strings if not has_bos_prefix(x, bos))
            kwargs = _add_special_kwargs(None, self.add_bos_token)
            ids = self.tokenizer(plain, **kwargs)["input_ids"] if plain else []
            self._encoded = dict(zip(plain, ids))
            try:
                return super().loglikelihood(requests, disable_tqdm=True)  # one bar per merge is noise
            finally:
                self._encoded = {}

        def tok_encode(
            self,
            string: str,
            add_special_tokens: bool | None = None,
            left_truncate_len: int | None = None,
            **kwargs: Any,
        ) -> list[int]:
            cached = getattr(self, "_encoded", {}).get(string)
            if cached is not None and add_special_tokens is None and not left_truncate_len and not kwargs:
                return list(cached)
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)

    _LM_CLASS = BatchTokenizingHFLM
    return _LM_CLASS


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str],
    *,
    zoo: Zoo | str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_fewshot: int | None = None,
    threads: int | None = 1,
    trust_task_code: bool = False,
) -> EvalResult:
    """Evaluate ``model`` (moved to ``device``) with lm-eval on ``tasks``; accuracy in percent.

    ``split`` picks the zoo split scored: ``test`` for reporting, ``validation`` for tuning merge hyper-parameters.
    ``limit`` scores only the first N examples of each task. Without ``zoo``, zoo names use the default full zoo
    under ``MERGEFLOW_HOME`` if it is built. ``num_fewshot`` defaults to 0 for zoo tasks and to the task's own
    setting for lm-eval tasks. ``threads`` pins torch's CPU threads for the call: zoo models are fastest on one, and
    multi-threaded kernels stall when another process holds a core; ``None`` keeps the current setting.
    ``trust_task_code`` lets lm-eval run the code of a zoo's task files (see :func:`check_task_code`).
    """
    return _evaluate(model, tokenizer, tasks, zoo=zoo, split=split, limit=limit, batch_size=batch_size,
                         device=device, num_fewshot=num_fewshot, threads=threads, trust_task_code=trust_task_code)


def _evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: str | Sequence[str], *,
              zoo: Zoo | str | Path | None, split: str, limit: int | None, batch_size: int,
              device: str | torch.device, num_fewshot: int | None, threads: int | None,
              trust_task_code: bool) -> EvalResult:
    names = split_task_names(tasks)
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be >= 1, got {limit}")
    the_zoo = resolve_zoo(zoo, names)
    plan = _plan(names, the_zoo)
    if the_zoo is not None:  # before lm-eval reads anything of the zoo's
        check_task_code(the_zoo, plan.zoo_tasks, trust_task_code=trust_task_code)

    offline_env()
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    task_objs: list[Any] = []
    locks: list[threading.Lock] = []
    if plan.zoo_tasks:
        assert the_zoo is not None
        for obj, lock in _zoo_task_objects(the_zoo, plan.zoo_tasks, split, num_fewshot or 0, trust_task_code):
            task_objs.append(obj)
            locks.append(lock)
    if plan.other_tasks:
        others = _other_task_objects(plan.other_tasks, the_zoo.tasks if the_zoo else ())
        for obj in others:
            if num_fewshot is not None or obj.get_config("num_fewshot") is None:
                obj.set_config(key="num_fewshot", value=num_fewshot or 0)
        task_objs += others
    model = model.to(device)
    model.eval()
    with _holding(locks), _SETTINGS.applied(threads if str(device) == "cpu" else None):
        for obj in task_objs:
            obj.set_fewshot_seed(seed=_FEWSHOT_SEED)
        lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        # lm_eval.evaluator.evaluate is simple_evaluate minus its bookkeeping (pip freeze, git hash: ~2 s a call).
        raw = lm_eval_evaluate(
            lm=lm,
            task_dict=(_inline_task_manager() if the_zoo else task_manager(None)).load(task_objs),
            limit=limit,
            bootstrap_iters=1000,  # acc's stderr is closed-form; bootstrapping is only for other metrics
            log_samples=False,
        )
    return _collect(raw, plan, split, limit)


def _pct(x: Any) -> float:
    return float("nan") if x is None or x == "N/A" else round(100.0 * float(x), 4)


def _collect(raw: dict[str, Any], plan: _Plan, split: str, limit: int | None) -> EvalResult:
    results, n_samples = raw["results"], raw.get("n-samples", {})
    scores: dict[str, TaskScore] = {}
    for short in plan.zoo_tasks:
        scores[short] = _score(results, n_samples, LM_EVAL_PREFIX + short)
    for name in plan.other_tasks:
        if name in results:
            scores[name] = _score(results, n_samples, name)
        else:  # an lm-eval group: report its leaves under their own names
            for leaf in raw.get("group_subtasks", {}).get(name, []):
                if leaf in results:
                    scores[leaf] = _score(results, n_samples, leaf)
    groups = {g: round(sum(scores[t].acc for t in members) / len(members), 4) for g, members in plan.groups.items()}
    return EvalResult(scores=scores, groups=groups, split=split, limit=limit, raw=_jsonable(raw))


def _score(results: dict[str, Any], n_samples: dict[str, Any], name: str) -> TaskScore:
    r = results.get(name, {})
    acc = r.get("acc,none")
    if acc is None:
        raise EvaluationError(f"lm-eval returned no accuracy for task {name!r} (metrics: {sorted(r)})")
    n = n_samples.get(name, {}).get("effective", 0)
    stderr = _pct(r.get("acc_stderr,none"))
    if math.isnan(stderr) and n > 1:
        stderr = round(100.0 * math.sqrt(float(acc) * (1 - float(acc)) / (n - 1)), 4)
    return TaskScore(acc=_pct(acc), stderr=stderr, n=int(n))


def _jsonable(raw: dict[str, Any]) -> dict[str, Any]:
    keep = {
        k: raw[k]
        for k in (
            "results",
            "groups",
            "group_subtasks",
            "configs",
            "versions",
            "n-shot",
            "higher_is_better",
            "n-samples",
        )
        if k in raw
    }
    return json.loads(json.dumps(keep, default=str))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's per-model warnings and its per-task progress bars while evaluating.

    Evaluating a matrix of merges would otherwise print a dozen bars and warnings per model. The bars can only be
    turned off through tqdm's import-time environment, so the module's ``tqdm`` is swapped for the call.
    """
    import lm_eval.api.task as task_module

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    original = getattr(task_module, "tqdm", None)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if original is not None:
        task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if original is not None:
            task_module.tqdm = original


def evaluate_path(
    model_dir: str | Path,
    tasks: str | Sequence[str],
    *,
    zoo: Zoo | str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    num_fewshot: int | None = None,
    threads: int | None = 1,
    trust_task_code: bool = False,
    adapter_base: str | Path | None = None,
) -> EvalResult:
    """Load a model folder (weights + tokenizer) and ``evaluate`` it; with ``adapter_base``, ``model_dir`` is a LoRA
    adapter applied to the checkpoint there (whose config and tokenizer it uses)."""
    if zoo is not None and not isinstance(zoo, Zoo):  # refuse an untrusted zoo before loading the model
        the_zoo = resolve_zoo(zoo, split_task_names(tasks))
        if the_zoo is not None:
            check_task_code(the_zoo, zoo_tasks(split_task_names(tasks), the_zoo), trust_task_code=trust_task_code)
            zoo = the_zoo
    offline_env()
    path = Path(model_dir).expanduser()
    folder = Path(adapter_base).expanduser() if adapter_base is not None else path
    if not (folder / "config.json").exists():
        raise EvaluationError(f"{folder} is not a model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_causal_lm(path, adapter_base=adapter_base)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot load the model at {path}: {e}") from None
    return evaluate(
        model, tokenizer, tasks, zoo=zoo, split=split, limit=limit, batch_size=batch_size, device=device,
        num_fewshot=num_fewshot, threads=threads, trust_task_code=trust_task_code,
    )  # fmt: skip
