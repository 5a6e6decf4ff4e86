"""Training: the jitted, scan-chunked AdamW loop on a device-resident 1k subset.

The step is the authors' (PyTorch) step: MSE over batch x 10 against one-hot targets, then
AdamW. Steps run in a `lax.scan` over chunks whose lengths come from a small fixed set
(`schedule.chunk_lengths`), with the state donated; the host touches the device once per
chunk. Evaluations happen exactly at scheduled steps and read the parameters only.

With `skip_zero_pixels` the step multiplies only FC1's input columns that are nonzero
(`pixel_columns`, computed on the host and passed to the step as `cols`); parameters and
optimizer state keep their full size between chunks. With the one subset-wide set, a chunk cuts
FC1's kernel and its AdamW moments to those rows for its whole scan (`_narrow_state`) and writes
them back at its end; with per-batch sets, each step gathers its rows and scatters its gradient.
With `fc1_weight_grad=pretransposed`, FC1's weight gradient is a plain product with the batch
transposed once per chunk (`model.matmul_pretransposed`). A sweep (`make_train_chunk(...,
wds=...)`) gives each replica its own weight decay.

The protocol (subset, init, loss, optimizer, batch cycle, evaluation) is docs/protocol.md.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grokjax.train.config import TrainConfig
from grokjax.data import select_subset, to_inputs
from grokjax.train.model import N_IN, forward, forward_columns, forward_narrow, init_params
from grokjax.train.schedule import chunk_lengths


class TrainState(NamedTuple):
    """Everything a resumed run needs (with the config)."""

    params: Any
    opt_state: Any
    step: jax.Array  # int64 number of updates done
    key: jax.Array  # uint32 PRNG key data for the optional per-epoch reshuffle


class Data(NamedTuple):
    """Device-resident arrays. Train arrays are in the class-sorted subset order."""

    x_train: jax.Array  # (1000, 784)
    y_train: jax.Array  # (1000,) int labels
    x_test: jax.Array  # (10000, 784)
    y_test: jax.Array  # (10000,)


def make_optimizer(cfg: TrainConfig, wd=None) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW: eps outside the sqrt, decay on all params, explicit wd.

    `wd` (a traced per-replica scalar in a sweep) replaces `cfg.wd`. The state's structure does
    not depend on it. With the default, the weight decay is the Python float `cfg.wd`, as always.
    """
    return optax.adamw(learning_rate=cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0,
                       weight_decay=cfg.wd if wd is None else wd, mask=None)


def mse_loss(params, x, y_onehot):
    """Mean over batch x 10 of (output - one_hot)^2: torch's MSELoss(reduction='mean')."""
    return jnp.mean((forward(params, x) - y_onehot) ** 2)


def mse_loss_columns(params, x_cols, cols, y_onehot, xt=None):
    """`mse_loss` from FC1's input columns `cols` only (`model.forward_columns`)."""
    return jnp.mean((forward_columns(params, x_cols, cols, xt) - y_onehot) ** 2)


def mse_loss_narrow(params, x_cols, y_onehot, xt=None):
    """`mse_loss` of a narrowed parameter tree: FC1's kernel holds only the rows of x_cols's pixels.

    `params["fc1"]` may also hold "rest" (the other rows, see `_narrow_state`): no output depends
    on it, so its gradient is exactly zero, as those rows' gradient is in the full-size step.
    With the full kernel and x it is `mse_loss`; `xt` as in `model.forward_narrow`.
    """
    return jnp.mean((forward_narrow(params, x_cols, xt) - y_onehot) ** 2)


def batch_perm(cfg: TrainConfig, seed: int | None = None) -> np.ndarray:
    """The authors' fixed batch order: RandomState(seed).permutation(n) over subset positions.

    Block b of the result (positions b*batch .. (b+1)*batch) is the batch used at every step
    t with t mod (n/batch) == b.
    """
    return np.random.RandomState(cfg.seed if seed is None else seed).permutation(cfg.n_train).astype(np.int64)


def make_data(cfg: TrainConfig, mnist: dict[str, np.ndarray]) -> Data:
    """Selects the stratified subset and puts train and test arrays on the device."""
    dtype = np.dtype(cfg.dtype)
    idx = select_subset(mnist["y_train"], cfg.n_per_class, cfg.data_seed)
    # device_put, not jnp.asarray: the same arrays, without compiling a copy program per shape
    return Data(*jax.device_put((to_inputs(mnist["x_train"][idx], dtype), mnist["y_train"][idx].astype(np.int32),
                                 to_inputs(mnist["x_test"], dtype), mnist["y_test"].astype(np.int32))))


def init_state(cfg: TrainConfig, seed: int | None = None) -> TrainState:
    """Fresh state: init from `jax.random.PRNGKey(seed)` (fold 0), reshuffle key (fold 1)."""
    root = jax.random.PRNGKey(cfg.seed if seed is None else seed)
    params = init_params(jax.random.fold_in(root, 0), cfg.width, cfg.init_scale, jnp.dtype(cfg.dtype))
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params),
                      step=jnp.zeros((), jnp.int64), key=jax.random.fold_in(root, 1))


def pixel_columns(cfg: TrainConfig, perm, x_train) -> np.ndarray | None:
    """FC1's input columns the step multiplies, by `cfg.skip_zero_pixels` (host numpy, int32).

    off: None. subset, and every mode with `cfg.reshuffle` (no fixed batches): the pixels
    nonzero in any training image, shape (K,). batch: per fixed batch b (block b of `perm`),
    the pixels nonzero in that batch in ascending order, padded to the largest count K with a
    pixel that is zero in batch b: shape (nb, K), or (S, nb, K) for a stack of S orders (S, n),
    K the largest count over all of them so that the replicas vmap.
    """
    mode = cfg.skip_zero_pixels
    if mode == "off":
        return None
    x = np.asarray(x_train)
    if mode == "subset" or cfg.reshuffle:
        return np.flatnonzero(np.any(x != 0, axis=0)).astype(np.int32)
    perm = np.asarray(perm)
    blocks = perm.reshape(-1, cfg.batches_per_epoch, cfg.batch)
    nonzero = np.stack([np.any(x[b] != 0, axis=1) for b in blocks])  # (S, nb, 784)
    k = int(nonzero.sum(-1).max())
    out = np.empty(nonzero.shape[:-1] + (k,), np.int32)
    for i in np.ndindex(*nonzero.shape[:-1]):
        on = np.flatnonzero(nonzero[i])
        pad = np.flatnonzero(~nonzero[i])[:1]  # exists whenever this batch's count is below k
        out[i] = np.concatenate([on, np.repeat(pad, k - on.size)])
    return out if perm.ndim == 2 else out[0]


def _per_batch_columns(cfg: TrainConfig) -> bool:
    return cfg.skip_zero_pixels == "batch" and not cfg.reshuffle


def _check_columns(cfg: TrainConfig, cols, replica_axis: bool) -> None:
    """Refuses `cols` that do not fit `cfg.skip_zero_pixels` (at trace time, so never silently)."""
    if cfg.skip_zero_pixels == "off":
        if cols is not None:
            raise ValueError("skip_zero_pixels=off takes no pixel columns (cols must be None)")
        return
    want = (3 if replica_axis else 2) if _per_batch_columns(cfg) else 1
    if cols is None or cols.ndim != want or cols.shape[-1] > N_IN:
        raise ValueError(f"skip_zero_pixels={cfg.skip_zero_pixels} needs the pixel columns of "
                         f"train.pixel_columns ({want}-d), got {None if cols is None else cols.shape}")


def _apply_update(opt: optax.GradientTransformation, state: TrainState, x, y, cols=None, narrow=False, xt=None):
    """One AdamW update of `state` on the batch (x, one-hot y); returns (state, loss).

    With `cols`, x holds only those input columns (x[:, cols] of the batch) and FC1's products
    skip the others; the gradient and the update stay full size. With `narrow`, the state is a
    narrowed one (`_narrow_state`): x holds the columns of FC1's kept kernel rows, in order.
    With `xt` (x.T), FC1's weight gradient is xt @ g (`fc1_weight_grad=pretransposed`).
    """
    if narrow or (cols is None and xt is not None):
        loss, grads = jax.value_and_grad(mse_loss_narrow)(state.params, x, y, xt)
    elif cols is None:
        loss, grads = jax.value_and_grad(mse_loss)(state.params, x, y)
    else:
        loss, grads = jax.value_and_grad(mse_loss_columns)(state.params, x, cols, y, xt)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1, state.key), loss


def _narrow_state(state: TrainState, rows: jax.Array, rest: jax.Array) -> TrainState:
    """`state` with FC1's kernel, and its AdamW mu and nu, cut to the kernel rows `rows`.

    The other rows, `rest`, ride along as params["fc1"]["rest"] (and in mu and nu): their
    gradient is exactly zero, so AdamW only decays them, element for element as in the
    full-size step (at weight decay 0 they never change). They are carried at every weight
    decay so that the compiled program does not depend on its value: left out at WD 0 only,
    a sharded sweep's WD-0 replicas differed in the last bit from a separate WD-0 run.
    """
    def cut(tree):
        kernel = tree["fc1"]["kernel"]
        fc1 = {**tree["fc1"], "kernel": jnp.take(kernel, rows, axis=0), "rest": jnp.take(kernel, rest, axis=0)}
        return {**tree, "fc1": fc1}

    adam, *others = state.opt_state
    opt_state = (adam._replace(mu=cut(adam.mu), nu=cut(adam.nu)), *others)
    return TrainState(cut(state.params), opt_state, state.step, state.key)


def _widen_state(narrow: TrainState, full: TrainState, rows: jax.Array, rest: jax.Array) -> TrainState:
    """The inverse of `_narrow_state`: `narrow`'s rows written back into `full`'s FC1 kernels."""
    def put(n, f):
        kernel = f["fc1"]["kernel"].at[rows].set(n["fc1"]["kernel"]).at[rest].set(n["fc1"]["rest"])
        fc1 = {k: v for k, v in n["fc1"].items() if k != "rest"}
        return {**n, "fc1": {**fc1, "kernel": kernel}}

    (adam, *others), (adam_f, *_) = narrow.opt_state, full.opt_state
    opt_state = (adam._replace(mu=put(adam.mu, adam_f.mu), nu=put(adam.nu, adam_f.nu)), *others)
    return TrainState(put(narrow.params, full.params), opt_state, narrow.step, narrow.key)


def fixed_batches(cfg: TrainConfig, perm: jax.Array, data: Data) -> tuple[jax.Array, jax.Array]:
    """The fixed cycle's batches, gathered once: x (nb, batch, 784) and one-hot y (nb, batch, 10).

    Batch b is block b of `perm`, the one `make_step` gathers at every step t with t mod nb == b.
    """
    idx = perm.reshape(cfg.batches_per_epoch, cfg.batch)
    eye = jnp.eye(10, dtype=data.x_train.dtype)
    return data.x_train[idx], eye[data.y_train[idx]]


def make_step(cfg: TrainConfig) -> Callable[..., tuple[TrainState, jax.Array]]:
    """One update: picks the batch for step t, takes the MSE gradient, applies AdamW.

    The returned function takes (state, perm, data, cols=None, wd=None); `perm` is the fixed
    batch order (`batch_perm`), unused when `cfg.reshuffle` draws a fresh order each epoch on
    device; `cols` is `pixel_columns(cfg, perm, x_train)` (None when skip_zero_pixels=off);
    `wd` a per-replica weight decay (None: `cfg.wd`).
    """
    nb, bs, n = cfg.batches_per_epoch, cfg.batch, cfg.n_train
    eye = jnp.eye(10, dtype=jnp.dtype(cfg.dtype))
    per_batch = _per_batch_columns(cfg)
    pretransposed = cfg.fc1_weight_grad == "pretransposed"

    def step(state: TrainState, perm: jax.Array, data: Data, cols=None, wd=None):
        _check_columns(cfg, cols, replica_axis=False)  # per replica when vmapped
        t = state.step
        if cfg.reshuffle:
            perm = jax.random.permutation(jax.random.fold_in(state.key, t // nb), n)
        idx = jax.lax.dynamic_slice(perm, ((t % nb) * bs,), (bs,))
        x = data.x_train[idx]
        if cols is not None:
            if per_batch:
                cols = jax.lax.dynamic_index_in_dim(cols, t % nb, keepdims=False)
            x = jnp.take(x, cols, axis=1)
        xt = jnp.swapaxes(x, 0, 1) if pretransposed else None  # per step here: no fixed batches to reuse
        return _apply_update(make_optimizer(cfg, wd), state, x, eye[data.y_train[idx]], cols, xt=xt)

    return step


def make_train_chunk(cfg: TrainConfig, n_seeds: int | None = None, *, wds=None, unroll: int = 1,
                     compiler_options: dict | None = None):
    """A jitted `chunk(state, perm, data, length, cols=None)` running `length` steps in one `lax.scan`.

    The state is donated. With `n_seeds`, state and perm carry a leading replica axis and the
    step is vmapped over it (data is shared). `cols` is `pixel_columns(cfg, perm, x_train)`
    (per replica with the batch set, shared with the subset set; None when skip_zero_pixels=off).
    Returns the new state and the loss of the chunk's last step (a cheap finiteness probe).

    wds: one weight decay per replica (a sweep; `n_seeds` replicas), in place of `cfg.wd`. The
    learning rate and everything else stay shared. unroll, compiler_options: passed to
    `lax.scan` and `jax.jit` (benchmark knobs; they never change the mathematics).

    With the fixed batch cycle the chunk gathers its batches once (`fixed_batches`) and each
    step indexes them by t mod nb: the same batches and the same mathematics as `make_step`,
    without a per-step row gather of the images (2-5% faster on CPU; see BENCHMARKS.md). The
    two are separate XLA programs: with skip_zero_pixels=off they agree bit for bit on CPU;
    with pixel columns XLA may compile FC1's narrowed products differently in each, so the
    order of summation, and the last bits, can differ (about 1e-15 after 23 steps;
    tests/test_train.py holds them to 1e-13 relative).

    With skip_zero_pixels=subset (and the fixed cycle) the scan runs on the narrowed state: FC1's
    kernel rows `cols` only, the other rows carried beside to be decayed (unchanged at WD 0).
    The products are those of the per-step row gather it replaced (whose 150-step params and
    moments it matched bit for bit, WD 0 and 0.01); the row gather and the full-size gradient
    scatter are gone from every step.
    With fc1_weight_grad=pretransposed the fixed batches are also transposed once per chunk.
    """
    nb = cfg.batches_per_epoch
    step = make_step(cfg)
    per_batch = _per_batch_columns(cfg)
    pretransposed = cfg.fc1_weight_grad == "pretransposed"
    if wds is not None:
        wds = np.asarray(wds, np.float64)
        if n_seeds is None or wds.shape != (n_seeds,):
            raise ValueError(f"wds needs one weight decay per replica ({n_seeds}), got {wds.tolist()}")

    def fixed_step(state: TrainState, xb: jax.Array, yb: jax.Array, xbt, cols, wd):
        b = state.step % nb
        x = jax.lax.dynamic_index_in_dim(xb, b, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(yb, b, keepdims=False)
        xt = None if xbt is None else jax.lax.dynamic_index_in_dim(xbt, b, keepdims=False)
        if per_batch:
            cols = jax.lax.dynamic_index_in_dim(cols, b, keepdims=False)
        return _apply_update(make_optimizer(cfg, wd), state, x, y, cols, xt=xt)

    def narrow_step(state: TrainState, xb: jax.Array, yb: jax.Array, xbt, wd):
        b = state.step % nb
        x = jax.lax.dynamic_index_in_dim(xb, b, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(yb, b, keepdims=False)
        xt = None if xbt is None else jax.lax.dynamic_index_in_dim(xbt, b, keepdims=False)
        return _apply_update(make_optimizer(cfg, wd), state, x, y, narrow=True, xt=xt)

    def batches(perm, data, cols):
        xb, yb = fixed_batches(cfg, perm, data)
        if per_batch:  # each batch's own columns, gathered once per chunk
            xb = jnp.take_along_axis(xb, cols[:, None, :], axis=2)
        elif cols is not None:
            xb = jnp.take(xb, cols, axis=2)
        # FC1's weight gradient from the batches transposed once per chunk (fc1_weight_grad)
        return xb, yb, (jnp.swapaxes(xb, -1, -2) if pretransposed else None)

    if n_seeds is not None:
        c_ax, w_ax = (0 if per_batch else None), (None if wds is None else 0)
        step = jax.vmap(step, in_axes=(0, 0, None, c_ax, w_ax))
        fixed_step = jax.vmap(fixed_step, in_axes=(0, 0, 0, 0, c_ax, w_ax))
        narrow_step = jax.vmap(narrow_step, in_axes=(0, 0, 0, 0, w_ax))
        batches = jax.vmap(batches, in_axes=(0, None, c_ax))
        narrow_state = jax.vmap(_narrow_state, in_axes=(0, None, None))
        widen_state = jax.vmap(_widen_state, in_axes=(0, 0, None, None))
    else:
        narrow_state, widen_state = _narrow_state, _widen_state
    # The subset column set (one set for every step and replica) narrows FC1 for the whole chunk.
    narrow = cfg.skip_zero_pixels == "subset" and not cfg.reshuffle

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=0, compiler_options=compiler_options)
    def chunk(state, perm, data, length: int, cols=None):
        _check_columns(cfg, cols, n_seeds is not None)
        wd = None if wds is None else jnp.asarray(wds)
        if cfg.reshuffle:
            def body(s, _):
                return step(s, perm, data, cols, wd)
        elif narrow:
            xb, yb, xbt = batches(perm, data, cols)
            # the rows outside cols, in order (cols is ascending and unique)
            keep = jnp.ones(N_IN, bool).at[cols].set(False)
            rest = jnp.nonzero(keep, size=N_IN - cols.shape[0])[0].astype(cols.dtype)

            def body(s, _):
                return narrow_step(s, xb, yb, xbt, wd)

            inner, losses = jax.lax.scan(body, narrow_state(state, cols, rest), None, length=length,
                                         unroll=unroll)
            return widen_state(inner, state, cols, rest), losses[-1]
        else:
            xb, yb, xbt = batches(perm, data, cols)

            def body(s, _):
                return fixed_step(s, xb, yb, xbt, cols, wd)

        state, losses = jax.lax.scan(body, state, None, length=length, unroll=unroll)
        return state, losses[-1]

    return chunk


def _accuracy_and_loss(params, x, labels, eye):
    out = forward(params, x)
    correct = (jnp.argmax(out, -1) == labels).astype(jnp.float64)
    return jnp.mean(correct), jnp.mean((out - eye[labels]) ** 2)


def evaluate(params, data: Data) -> dict[str, jax.Array]:
    """Full-set metrics of one parameter set (device arrays; see `make_evaluate`)."""
    eye = jnp.eye(10, dtype=data.x_train.dtype)
    train_acc, train_loss = _accuracy_and_loss(params, data.x_train, data.y_train, eye)
    test_acc, test_loss = _accuracy_and_loss(params, data.x_test, data.y_test, eye)
    leaves = jax.tree.leaves(params)
    sq = sum(jnp.sum(a.astype(jnp.float64) ** 2) for a in leaves)
    sq_w = sum(jnp.sum(params[k]["kernel"].astype(jnp.float64) ** 2) for k in params)
    sq_fc3 = sum(jnp.sum(a.astype(jnp.float64) ** 2) for a in jax.tree.leaves(params["fc3"]))
    return {
        "train/loss": train_loss, "train/acc": train_acc,
        "test/loss": test_loss, "test/acc": test_acc,
        "params/l2": jnp.sqrt(sq), "params/l2_weights": jnp.sqrt(sq_w), "params/l2_fc3": jnp.sqrt(sq_fc3),
    }


def make_evaluate(n_seeds: int | None = None):
    """Jitted `evaluate`, vmapped over a leading seed axis of params when `n_seeds` is set."""
    fn = evaluate if n_seeds is None else jax.vmap(evaluate, in_axes=(0, None))
    return jax.jit(fn)


def run_steps(cfg: TrainConfig, state: TrainState, perm, data: Data, n: int, chunk_fn=None) -> TrainState:
    """Runs n steps through the scan chunks (a convenience for tests and benchmarks)."""
    chunk_fn = chunk_fn or make_train_chunk(cfg)
    cols = pixel_columns(cfg, perm, data.x_train)
    for length in chunk_lengths(n, cfg.chunk):
        state, _ = chunk_fn(state, perm, data, length, cols)
    return state
