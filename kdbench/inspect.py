"""``python -m kdbench.inspect``: a model's module paths and their output shapes, to pick taps.

Takes the same overrides as ``python -m kdbench`` (``student=``, ``teacher=``, ``dataset=``, any
value) plus ``role=student|teacher|both`` (default both). Builds the model(s) exactly as a run
does, runs one forward pass on a dummy batch of the data set's input shape with a hook on every
module, and prints each module path with its type, output shape (per sample) and parameters,
marking the taps the config uses now (the architecture's ``default_taps`` with the config's
``taps`` applied). The data set is opened, not generated: its input shape and class count are
all that is needed.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kdbench.cli import config_dir
from kdbench.errors import ConfigError, KdbenchError, run_or_exit

ROLES = ("student", "teacher", "both")
TAP_USE = (
    "stages are feature maps (attention transfer), hint any output (FitNets), embedding a "
    "vector (relation methods); transformers: hidden, attention, values, final per token "
    "(hidden_cos, minilm)"
)


def _shape(out) -> str:
    import torch

    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape[1:])) if out.dim() > 0 else "()"
    if isinstance(out, list | tuple):
        return type(out).__name__ + " of " + ", ".join(_shape(o) for o in out)
    if isinstance(out, dict):
        return "dict of " + ", ".join(f"{k}: {_shape(v)}" for k, v in out.items())
    return type(out).__name__


def _tap_marks(taps: dict) -> dict[str, list[str]]:
    marks: dict[str, list[str]] = {}
    for tap, value in taps.items():
        paths = value if isinstance(value, list) else [value]
        for i, path in enumerate(paths):
            if path is not None:
                label = f"{tap}[{i}]" if isinstance(value, list) else tap
                marks.setdefault(path, []).append(label)
    return marks


def describe(spec, dm, where: str) -> list[str]:
    """The listing of one model (lines); raises KdbenchError after listing what ran when the
    forward pass fails."""
    import torch

    from kdbench.models import build_from_spec, count_parameters, model_id, model_name
    from kdbench.taps import resolve_taps

    model = build_from_spec(spec, dm.num_classes, dm.input_shape, where, check_output=False)
    overrides = spec.get("taps")
    problem = None
    try:
        taps = resolve_taps(model, dict(overrides) if overrides else {}, where)
    except KdbenchError as exc:  # still list the modules: that is how to find the right path
        taps, problem = dict(getattr(model, "default_taps", {}) or {}), str(exc).split("; ")[0]
    seen: dict[str, list] = {}
    modules = dict(model.named_modules())

    def hook(path):
        def record(_module, _inputs, output):
            entry = seen.setdefault(path, [output, 0])
            entry[1] += 1

        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in modules.items()]
    shape = (2, *dm.input_shape)
    error = None
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape, dtype=getattr(dm, "input_dtype", torch.float32)))
    except Exception as exc:  # noqa: BLE001 - shown after the modules that did run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {first}"
    finally:
        for h in handles:
            h.remove()
    name, ident = model_name(spec), model_id(spec)
    lines = [
        f"{where}: {name}"
        + (f" ({ident})" if ident != name else "")
        + f", {count_parameters(model):,} parameters; input {tuple(dm.input_shape)} per sample, "
        f"{dm.num_classes} classes"
    ]
    marks = _tap_marks(taps)
    rows = [("module path", "type", "output per sample", "params", "tap now")]
    for path, module in modules.items():
        out = seen.get(path)
        shown = "(not called)" if out is None else _shape(out[0])
        if out is not None and out[1] > 1:
            shown += f" x{out[1]} calls"
        params = sum(p.numel() for p in module.parameters())
        label = path or "(the model: logits)"
        rows.append(
            (label, type(module).__name__, shown, f"{params:,}", ", ".join(marks.get(path, [])))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:4], widths, strict=True)] + [r[4]]
        lines.append("  " + "  ".join(cells).rstrip())
    now = ", ".join(f"{k}={v!r}" for k, v in taps.items()) or "none"
    lines.append(f"  taps now: {now}  (change one with {where}.taps.<tap>=<module path>)")
    if problem:
        lines.append(f"  note: {problem}")
    if error is None:
        root = seen.get("")
        logits = root[0] if root else None
        lm = getattr(dm, "task", "classify") == "lm"  # one row of logits per token
        want = (2, *dm.input_shape, dm.num_classes) if lm else (2, dm.num_classes)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
            need = f"(batch, {', '.join(map(str, want[1:]))})"
            lines.append(
                f"  note: a run needs logits of shape {need}; this model "
                f"returns {_shape(logits) if logits is not None else 'nothing'} per sample"
            )
    print("\n".join(lines))
    if error is not None:
        raise KdbenchError(
            f"{where}: the forward pass on a batch of shape {shape} failed ({error}); the "
            "modules listed with a shape ran before it"
        )
    return lines


def inspect_models(cfg: DictConfig) -> None:
    from kdbench.errors import checked_instantiate
    from kdbench.modelspec import arch_of
    from kdbench.teacher import member_specs

    role = cfg.get("role", "both")
    if role not in ROLES:
        raise ConfigError("role", role, f"must be one of {', '.join(ROLES)}")
    dm = checked_instantiate(cfg.dataset, _convert_="all")
    for r in ("student", "teacher") if role == "both" else (role,):
        if r == "teacher" and arch_of(cfg.teacher) == "ensemble":
            specs = [(f"teacher.members[{i}]", s) for i, s in enumerate(member_specs(cfg))]
        else:
            specs = [(r, cfg[r])]
        for where, spec in specs:
            describe(spec, dm, where)
            print()
    print(f"taps: {TAP_USE}")


@hydra.main(config_path=config_dir(), config_name="inspect", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from kdbench.validate import check_config

    run_or_exit(check_config, cfg)
    run_or_exit(inspect_models, cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
