"""The training configuration: one frozen dataclass whose defaults are the paper's values.

Every field is a command-line flag of `experiments/run.py` (same name, `--flag value`) whose
`--help` line is the field's metadata `help`.
Sources: the paper's Table 3 (App. A) and the authors' notebook (see the README); for the
modular-addition task (`task="modadd"`, the paper's App. H), Nanda et al.'s code
(`grokjax.modadd.config`, docs/modadd.md).

Two tasks share the class. The fields of one task only (`MLP_FIELDS`, `MODADD_FIELDS`) are None
in a config of the other task and are not written to its config.json; setting one of them for
the other task is refused. The shared fields `steps`, `lr`, `wd` and `b2` have a default per
task (`TASK_DEFAULTS`). To tell a default from the same value given, an unset field holds its
default as a marked value (`_Default*`, equal to the plain value), replaced by the plain
value in `__post_init__`: a resolved config holds plain values only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# The most steps a run may ask for (10^7 takes hours; this bound only rejects absurd values).
MAX_STEPS = 10**10
KEEP_PARAMS = ("all", "log", "none")
SKIP_ZERO_PIXELS = ("batch", "subset", "off")
FC1_WEIGHT_GRAD = ("autodiff", "pretransposed")
TASKS = ("mnist_mlp", "modadd")
# Science fields added after runs were started: the value a run directory whose config.json
# lacks the field ran with (and keeps when resumed).
LEGACY_FIELDS = {"skip_zero_pixels": "off", "fc1_weight_grad": "autodiff"}


class ConfigError(ValueError):
    """A bad configuration value; the CLI prints it as one line and exits with code 2."""


def parse_steps(value: Any) -> int:
    """Parses a step count such as `1e7`, `100000` or `1_000`; rejects non-integers.

    Returns:
        The integer number of steps.
    """
    if isinstance(value, bool):
        raise ConfigError(f"steps must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        raise ConfigError(f"steps must be an integer like 100000 or 1e7, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ConfigError(f"steps must be a whole number, got {value!r}")
    return int(f)


_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: Any) -> float:
    """Parses a wall-clock duration: `2h30m`, `150m`, `90s`, `1h`, or plain seconds (`5400`).

    Returns:
        Seconds (> 0).
    """
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if not text or m is None or not any(m.groups()):
            raise ConfigError(f"time limit must look like 2h30m, 150m, 90s or a number of seconds, "
                              f"got {value!r}") from None
        seconds = sum(float(g) * _DURATION_UNITS[u] for g, u in zip(m.groups(), "hms") if g)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"time limit must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """`2h05m`, `4m10s`, `12s`."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class _DefaultInt(int):
    """An int default not given by the user (see the module docstring)."""


class _DefaultFloat(float):
    """A float default not given by the user."""


class _DefaultStr(str):
    """A str default not given by the user."""


_MARKED = {int: _DefaultInt, float: _DefaultFloat, str: _DefaultStr}
_PLAIN = {v: k for k, v in _MARKED.items()}


def _marked(value: Any) -> Any:
    """`value` marked as a default (bools and None cannot be marked and stay as they are)."""
    kind = _MARKED.get(type(value))
    return kind(value) if kind is not None else value


def _plain(value: Any) -> Any:
    """A marked default as its plain value; anything else unchanged."""
    kind = _PLAIN.get(type(value))
    return kind(value) if kind is not None else value


def is_default(value: Any) -> bool:
    """Whether `value` is a marked (not given) default."""
    return type(value) in _PLAIN


def _field(default: Any, help_text: str, *, science: bool = True) -> Any:
    """A TrainConfig field with its flag's one-line help and whether it changes the science."""
    return dataclasses.field(default=default, metadata={"help": help_text, "science": science})


def _task_field(default: Any, help_text: str, *, science: bool = True) -> Any:
    """A field whose default depends on the task or that one task only uses (marked default)."""
    return _field(_marked(default), help_text, science=science)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every knob of a training run. Defaults reproduce the paper's WD=0 main run.

    Each field's metadata holds `help` (the flag's one-line meaning in `run.py --help`) and
    `science` (False: the field does not change the trajectory or the records, and a run
    directory may be resumed with another value).
    """

    # Decoupled, applied to all parameters, biases included. Paper: 0 for the main run, 0.01 for
    # the App. C control.
    wd: float = _task_field(0.0, "AdamW decoupled weight decay (paper: 0; 0.01 in App. C; modadd: 1.0, "
                                     "Nanda et al.)")
    # Table 3: 1e7. The time is the whole run's, evaluations and checkpoints included.
    steps: int = _task_field(10_000_000, "optimizer updates N, e.g. 1e7 (modadd: 50000, Nanda et al.) (paper: 1e7 = 10^7, about 4-16 h on a "
                                    "2-core CPU at 170-630 steps/s, hosts differ; GPU: unmeasured)")
    seed: int = _field(0, "seed of the init, the batch order and the progress-measure subset")
    # The authors' numpy seed 0. Kept apart from `seed` so that runs with different seeds train
    # on the same images.
    data_seed: int = _task_field(0, "seed of the stratified training subset (apart from --seed)")
    # Constant: no schedule, no warm-up, no clipping.
    lr: float = _task_field(5e-4, "AdamW learning rate, constant (paper: 5e-4; modadd: 1e-3 after a "
                                   "warm-up, Nanda et al.)")
    # Adam moment decay rates and epsilon: PyTorch's defaults, as the authors used.
    b1: float = _field(0.9, "Adam beta1 (PyTorch's default, as the authors')")
    b2: float = _task_field(0.999, "Adam beta2 (PyTorch's default; modadd: 0.98, Nanda et al.)")
    eps: float = _field(1e-8, "Adam epsilon (PyTorch's default)")
    # Table 3: 200, so 5 batches per pass over the 1k subset.
    batch: int = _task_field(200, "mini-batch size; divides 10*n_per_class (paper: 200)")
    # The MLP has depth 3.
    width: int = _task_field(200, "hidden width of the MLP 784-width-width-10 (paper: 200)")
    # Every weight and bias is multiplied by this after PyTorch's default Linear init (the
    # authors' saved demo cell used 4.0).
    init_scale: float = _task_field(8.0, "multiplies PyTorch's default init of every parameter (paper: 8)")
    # Table 3: 100, so 1,000 images.
    n_per_class: int = _task_field(100, "training images per class, 1..5421 (paper: 100)")
    # False: the authors' fixed cycle of 5 batches (itertools.cycle replays the first epoch).
    # True: Omnigrok's per-epoch reshuffle (not the paper's protocol).
    reshuffle: bool = _field(False, "reshuffle each epoch (Omnigrok) instead of the authors' fixed batch cycle")
    # float32 is announced loudly and recorded.
    dtype: str = _field("float64", "float64 (the paper's) or float32 (speed studies only)")
    # On top of the authors' rule; they never change the trajectory.
    log_points_per_decade: int = _field(20, "extra log-grid evaluation steps a decade (0: none)")
    # The authors' rule: t<30; t<150 and t%10==0; t%ceil(N/150)==0. Only quick tests switch it off.
    authors_grid: bool = _field(True, "evaluate on the authors' 191-step grid (0 and N always)")
    # Shorter segments are split into power-of-two chunks so that at most log2(chunk)+1 lengths
    # are ever compiled.
    chunk: int = _field(4096, "longest compiled scan chunk in steps (speed only)", science=False)
    # The latest 2 full states are kept.
    full_save_secs: float = _field(60.0, "least seconds between full-state (resume) checkpoints", science=False)
    # Holds config.json, metrics.jsonl and the checkpoints.
    out: str = _field("ckpts/run", "run directory; the same --out resumes the run", science=False)
    overwrite: bool = _field(False, "replace a run directory whose config differs (else: refuse)", science=False)
    progress: bool = _field(True, "progress on stderr: a bar on a terminal, else a line every 30 s", science=False)
    cache_dir: str | None = _field(None, "MNIST cache dir (None: $GROKJAX_CACHE or the user cache dir)",
                                   science=False)
    # The four standard files, optionally gzipped.
    idx_dir: str | None = _field(None, "a directory with the 4 MNIST IDX files (optionally .gz)", science=False)
    # In seconds (the CLI accepts 2h30m, 150m, 90s; 0: none). When it is spent the run finishes
    # the chunk in flight, writes a full state, prints `paused at step X of N ...` and exits with
    # code 75; rerunning the command continues.
    time_limit: float = _field(0.0, "pause after this long (2h30m, 150m, 90s, seconds; 0: never): "
                                    "exit 75, rerun to continue", science=False)
    # Alpha, traps, spectra and progress measures into monitor/. Never changes the trajectory.
    monitor: bool = _field(True, "in-loop HTSR monitor and live early warning at each evaluation",
                           science=False)
    # log: about 5 a decade plus the authors' schedule, 0 and N (217 of 299 at 10^7 steps, 335 MB);
    # all: every evaluation step (461 MB at 10^7); none: the monitor's record and the full
    # states only. The monitor's record carries the analysis; the trap ablation needs params.
    keep_params: str = _field("log", "params checkpoints kept: log (about 5 a decade plus the authors' "
                                     "schedule), all (every evaluation; the trap ablation at every step) or none",
                              science=False)
    # Exact mathematics: for such a pixel FC1's weight-gradient row is exactly zero, so AdamW
    # leaves its m and v unchanged and the row moves by weight decay only; only the order of
    # summation inside FC1's products changes. Parameters and optimizer state stay full size.
    # batch: per fixed batch, the pixels nonzero in that batch (padded to the largest batch's
    # count with a pixel zero in the batch); subset: the pixels nonzero anywhere in the training
    # subset (also what --reshuffle uses); off: dense. A run directory started before this field
    # existed resumes with off.
    # subset is the default: narrowed once per chunk, it is the fastest (BENCHMARKS.md, E24).
    skip_zero_pixels: str = _task_field("subset", "skip FC1's zero input pixels (exact): subset, batch or off")
    # How FC1's weight gradient x^T g is computed: autodiff (the dot XLA emits, with a transposed
    # left operand) or pretransposed (x^T laid out once per scan chunk from the fixed batches,
    # then a plain product; with --reshuffle, transposed at every step). The same mathematics;
    # the rounding differs (another GEMM path on CPU). A run directory started before this field
    # existed resumes with autodiff. pretransposed is the default: +8-12 % on CPU (E25).
    fc1_weight_grad: str = _task_field("pretransposed", "FC1's weight gradient: pretransposed or autodiff (the "
                                  "same mathematics, another GEMM path)")

    # The task: the paper's MNIST MLP, or the one-layer transformer on (a + b) mod p of its
    # App. H (docs/modadd.md). The fields below are the transformer's; their defaults are
    # Nanda et al.'s (`grokjax.modadd.config.ModAddConfig`, where each has its source).
    task: str = _field("mnist_mlp", "mnist_mlp (the paper's MLP) or modadd (the one-layer transformer on "
                                    "(a + b) mod p, the paper's App. H)")
    p: int = _task_field(113, "modadd: the modulus p (paper: 113)")
    frac_train: float = _task_field(0.3, "modadd: fraction of the p^2 pairs in the training split (Nanda et al.)")
    split_seed: int = _task_field(0, "modadd: seed of the train/test split (Nanda et al.'s 0)")
    d_model: int = _task_field(128, "modadd: residual width (paper: 128)")
    n_heads: int = _task_field(4, "modadd: attention heads (paper: 4)")
    d_head: int = _task_field(32, "modadd: width of a head (paper: 32)")
    d_mlp: int = _task_field(512, "modadd: hidden width of the MLP (paper: 512)")
    warmup: int = _task_field(10, "modadd: linear learning-rate warm-up steps, 0: none (Nanda et al.: 10)")
    # Which forward the step trains through (`grokjax.modadd.step.FORWARDS`); all three agree
    # to ~1e-15 in float64, tables is the fastest on CPU. A science field (as fc1_weight_grad):
    # the rounding differs, so a resume with another forward would not be bitwise.
    forward: str = _task_field("tables", "modadd: training forward, tables, last or full (the same "
                                         "mathematics, another rounding; tables is the fastest)")

    def __post_init__(self):
        self._resolve_task()
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("seed", "data_seed") if self.task == "mnist_mlp" else ("seed",):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if not (self.wd >= 0 and math.isfinite(self.wd)):
            raise ConfigError(f"wd must be a finite number >= 0, got {self.wd!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps >= 0):
            raise ConfigError("b1 and b2 must lie in [0, 1) and eps must be >= 0")
        if self.task == "mnist_mlp":
            self._check_mlp()
        else:
            self.modadd()  # ModAddConfig checks the transformer's fields
            if self.forward not in MODADD_FORWARDS:
                raise ConfigError(f"forward must be one of {', '.join(MODADD_FORWARDS)}, got {self.forward!r}")
        if self.dtype not in ("float64", "float32"):
            raise ConfigError(f"dtype must be float64 or float32, got {self.dtype!r}")
        if self.log_points_per_decade < 0:
            raise ConfigError("log_points_per_decade must be >= 0")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if self.full_save_secs < 0:
            raise ConfigError("full_save_secs must be >= 0")
        if not self.out:
            raise ConfigError("out must be a directory path")
        if self.steps > MAX_STEPS:
            raise ConfigError(f"steps must be at most {MAX_STEPS:.0e}, got {self.steps:.3g}")
        if not (self.time_limit >= 0 and math.isfinite(self.time_limit)):
            raise ConfigError(f"time_limit must be a finite number of seconds >= 0, got {self.time_limit!r}")
        if self.keep_params not in KEEP_PARAMS:
            raise ConfigError(f"keep_params must be one of {', '.join(KEEP_PARAMS)}, got {self.keep_params!r}")

    def _resolve_task(self) -> None:
        """Refuses the other task's fields, fills the task's defaults and unmarks every value
        (see the module docstring)."""
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        other = MODADD_FIELDS if self.task == "mnist_mlp" else MLP_FIELDS
        given = [k for k in other if _given(getattr(self, k), _DEFAULTS[k])]
        if given:
            flags = ", ".join(f"--{k}" for k in given)
            raise ConfigError(f"{flags} {'is' if len(given) == 1 else 'are'} not used by --task {self.task} "
                              f"(only by --task {'modadd' if self.task == 'mnist_mlp' else 'mnist_mlp'})")
        for k in other:
            object.__setattr__(self, k, None)
        for k, v in TASK_DEFAULTS[self.task].items():
            if is_default(getattr(self, k)):
                object.__setattr__(self, k, v)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))

    def _check_mlp(self) -> None:
        if self.n_per_class < 1 or self.n_per_class > 5421:
            raise ConfigError(f"n_per_class must be in 1..5421, got {self.n_per_class}")
        n = 10 * self.n_per_class
        if self.batch < 1 or n % self.batch:
            raise ConfigError(f"batch must divide the subset size {n}, got {self.batch}")
        if self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ConfigError(f"init_scale must be a finite number > 0, got {self.init_scale!r}")
        if self.skip_zero_pixels not in SKIP_ZERO_PIXELS:
            raise ConfigError(f"skip_zero_pixels must be one of {', '.join(SKIP_ZERO_PIXELS)}, "
                              f"got {self.skip_zero_pixels!r}")
        if self.fc1_weight_grad not in FC1_WEIGHT_GRAD:
            raise ConfigError(f"fc1_weight_grad must be one of {', '.join(FC1_WEIGHT_GRAD)}, "
                              f"got {self.fc1_weight_grad!r}")

    def modadd(self):
        """The `grokjax.modadd.config.ModAddConfig` of a modadd config (ConfigError if invalid)."""
        from grokjax.modadd.config import ModAddConfig  # noqa: PLC0415

        if self.task != "modadd":
            raise ConfigError(f"a --task {self.task} config has no modadd settings")
        try:
            return ModAddConfig(**{k: getattr(self, k) for k in MODADD_CONFIG_FIELDS})
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def n_train(self) -> int:
        """Size of the training subset."""
        return 10 * self.n_per_class

    @property
    def batches_per_epoch(self) -> int:
        """Number of mini-batches in one pass over the subset."""
        return self.n_train // self.batch

    def to_dict(self) -> dict[str, Any]:
        """The task's fields as a JSON-ready dict (config.json's "config").

        An MLP config leaves out `task` and the transformer's fields, so that its config.json
        is what it was before the task existed (a config.json without `task` is mnist_mlp); a
        modadd config leaves out the MLP's fields.
        """
        skip = {"task", *MODADD_FIELDS} if self.task == "mnist_mlp" else set(MLP_FIELDS)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def science(self) -> dict[str, Any]:
        """The fields that determine the trajectory and the records (for resume checks)."""
        d = self.to_dict()
        for k in NON_SCIENCE_FIELDS:
            d.pop(k, None)
        return d


def field_from_text(name: str, text: str) -> Any:
    """The value of TrainConfig field `name` written as `text`, typed as the field's default.

    Raises ConfigError (one line) for an unknown field or a value of the wrong type.
    """
    if name not in _DEFAULTS:
        raise ConfigError(f"no training field {name!r}")
    kind = type(_DEFAULTS[name])
    if kind is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"{name} must be true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {text!r}") from None


def split_fields(pairs) -> tuple[dict[str, Any], dict[str, str]]:
    """(KEY, VALUE) text pairs split into TrainConfig fields (typed by `field_from_text`, and
    checked by TrainConfig itself) and the other pairs, as given.

    Raises ConfigError (one line) for a field value that does not parse or that TrainConfig refuses.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: field_from_text(k, v) for k, v in pairs if k in names}
    dataclasses.replace(TrainConfig(out="unused"), **fields)
    return fields, {k: v for k, v in pairs if k not in names}


# Fields that do not change the science (metadata science=False): a run directory may be resumed
# with other values.
NON_SCIENCE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata["science"])


# The fields of one task only (None in the other task's configs; not in its config.json).
MLP_FIELDS = ("data_seed", "batch", "width", "init_scale", "n_per_class", "reshuffle", "cache_dir", "idx_dir",
              "skip_zero_pixels", "fc1_weight_grad")
MODADD_FIELDS = ("p", "frac_train", "split_seed", "d_model", "n_heads", "d_head", "d_mlp", "warmup", "forward")
MODADD_FORWARDS = ("last", "tables", "full")  # grokjax.modadd.step.FORWARDS (not imported: it pulls in JAX)
# TrainConfig fields that make the ModAddConfig (`TrainConfig.modadd`).
MODADD_CONFIG_FIELDS = ("p", "frac_train", "split_seed", "seed", "d_model", "n_heads", "d_head", "d_mlp", "lr",
                        "wd", "b1", "b2", "eps", "warmup", "dtype")
# The shared fields whose default depends on the task. mnist_mlp: the field defaults (the paper's);
# modadd: Nanda et al.'s (`grokjax.modadd.config.ModAddConfig`), steps their num_epochs (50,000).
TASK_DEFAULTS = {"mnist_mlp": {}, "modadd": {"steps": 50_000, "lr": 1e-3, "wd": 1.0, "b2": 0.98}}
# The plain default of every field (the field defaults unmarked).
_DEFAULTS = {f.name: _plain(f.default) for f in dataclasses.fields(TrainConfig)}


def _given(value: Any, default: Any) -> bool:
    """Whether a field's value was given rather than left at its default: a marked default and
    None are not given; a bool cannot be marked, so only a non-default bool counts as given."""
    if value is None or is_default(value):
        return False
    return not (isinstance(value, bool) and value == default)
