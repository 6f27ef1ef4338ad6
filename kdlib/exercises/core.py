"""The machinery of the self-checking exercises: cases, the comparison, the sentences (see the package)."""
from __future__ import annotations

import html
import inspect
import linecache
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib import losses
from kdlib.errors import KDLibError


#: relative tolerance of the comparison (float32 against a float64 reference)
RTOL = 1e-4
#: absolute tolerance: float32 round-off of a KL between nearly equal distributions (TCKD) reaches 1e-6
ATOL = 5e-6
#: the visible check's seed; the grader uses others
CHECK_SEED = 0


class ExerciseFailed(AssertionError):
    """Raised by :func:`grade` (the autograder) with the check's sentence."""


# -- the verdict ----------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What a check found: ``passed`` and one sentence (``message``); shows itself in a notebook."""

    exercise: str
    passed: bool
    message: str
    checked: str = ""  # what was compared, in words

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "✔ right" if self.passed else "✘ not yet"
        return f"{mark} ({self.exercise}): {self.message}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        colour, mark = ("#1a7f37", "✔ right") if self.passed else ("#b35900", "✘ not yet")
        return (f'<div class="kdlib-exercise-verdict" style="border-left:4px solid {colour};padding:4px 10px">'
                f'<b style="color:{colour}">{mark}</b> <code>{html.escape(self.exercise)}</code>: '
                f"{html.escape(self.message)}</div>")


# -- cases ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One call of the student's function: its keyword inputs, and the sizes the sentences name."""

    inputs: Dict[str, Any]
    B: int = 1
    C: int = 1
    T: float = 1.0
    #: what B counts where it is not a batch of logits ("seeds"): the sentences say "B seeds"
    counts: str = ""

    def describe(self) -> str:
        if self.counts:
            return f"{self.B} {self.counts}"
        if "difficulty" in self.inputs:
            return f"{self.B} images"
        parts = [f"B = {self.B}", f"C = {self.C}"]
        if "temperature" in self.inputs or "temperatures" in self.inputs:
            parts.append(f"T = {self.T:g}")
        return ", ".join(parts)


#: (batch size, classes, temperature) of the cases; all different, so that a factor T, T², B or C is
#: told apart from the others
SHAPES = ((8, 10, 4.0), (5, 7, 1.0), (16, 100, 2.0), (3, 20, 8.0))


def logit_cases(seed: int, targets: bool = True, k: Optional[int] = None, shapes=SHAPES,
                 confident_teacher: bool = False) -> List[Case]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for b, c, t in shapes:
        zs = torch.randn(b, c, generator=gen) * 2.0
        zt = torch.randn(b, c, generator=gen) * 3.0
        inputs: Dict[str, Any] = {"student_logits": zs, "teacher_logits": zt}
        if targets:
            y = torch.randint(0, c, (b,), generator=gen)
            if confident_teacher:  # the teacher sure of the label, the student unsure: large ratios
                zt[torch.arange(b), y] += 6.0
                zs[torch.arange(b), y] -= 2.0 * torch.rand(b, generator=gen)
            inputs["targets"] = y
        if k is not None:
            inputs["k"] = min(k, c - 1)
        inputs["temperature"] = t
        cases.append(Case(inputs, b, c, t))
    return cases


# -- the exercises --------------------------------------------------------------------------------------
@dataclass
class Mistake:
    """A typical wrong answer, written as a student would write it, and the sentence that explains it."""

    name: str
    fn: Callable
    sentence: str


@dataclass
class Exercise:
    """One self-checking exercise: the signature the student fills in and kdlib's answer."""

    name: str
    chapter: str
    title: str
    practises: str
    args: Tuple[str, ...]
    reference: Callable  # kdlib's own function, called like the student's (keyword arguments)
    reference_name: str
    cases: Callable[[int], List[Case]]
    what: str = "loss"  # "loss", "gradient", "weights", ...: the noun of the sentences
    wrt: Optional[str] = "student_logits"  # the input whose autograd gradient is compared (None: values only)
    scalar: bool = True
    mistakes: List[Mistake] = field(default_factory=list)
    factor_hints: Dict[str, str] = field(default_factory=dict)
    #: (case) -> {group name: bool mask of the output's shape}, to say where a tensor output is wrong
    groups: Optional[Callable[[Case], Dict[str, Tensor]]] = None
    values_right_gradient_wrong: str = ("your values are right but their gradient is not: part of your "
                                        "computation is cut off from autograd (.detach(), .item(), numpy, "
                                        "torch.no_grad()) or something that must be a constant carries a "
                                        "gradient")
    gradient_right_values_wrong: str = ""
    #: grading parts (name -> what it checks), one hidden test cell each
    parts: Tuple[str, ...] = ("values", "gradients", "T = 1")

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.args)})"


EXERCISES: Dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    if exercise.wrt is None:
        exercise.parts = tuple(p for p in exercise.parts if p != "gradients")
    EXERCISES[exercise.name] = exercise
    return exercise


def names() -> List[str]:
    return list(EXERCISES)


def for_chapter(chapter: str) -> List[Exercise]:
    """The exercises of a chapter (``kd``, ``dkd``, ...), in the order of the chapter."""
    return [e for e in EXERCISES.values() if e.chapter == chapter]


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise KDLibError(f"unknown exercise {name!r}; exercises: {', '.join(EXERCISES)}")
    return EXERCISES[name]


# Small helpers the mistakes are written with (as a student would write them).
def kl_rows(p_t: Tensor, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    return (p_t * (log_p_t - log_p_s)).sum(1)


def log_soft(z: Tensor, t, dim: int = 1) -> Tensor:
    return F.log_softmax(z / t, dim=dim)


def label_groups(case: Case) -> Dict[str, Tensor]:
    mask = losses.target_mask(case.inputs["student_logits"], case.inputs["targets"])
    return {"the label's column": mask, "the other classes (not the label)": ~mask}


def topk_groups(case: Case) -> Dict[str, Tensor]:
    i = case.inputs
    mask = losses.topk_mask(i["student_logits"], i["teacher_logits"], i["k"], "student")
    return {"the student's Top-K classes": mask, "the classes outside the Top-K": ~mask}


# -- evaluation -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """The student's (or a mistake's) output and gradient on one case, or why there is none."""

    value: Optional[Tensor] = None
    grad: Optional[Tensor] = None
    problem: Optional[str] = None  # a sentence: the call failed, wrong type, no gradient ...


def _projection(shape, seed: int = 12345) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _inputs(case: Case, dtype) -> Dict[str, Any]:
    return {k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)
            for k, v in case.inputs.items()}


def _your_line(fn: Callable, exc: BaseException) -> str:
    """' (line N of your cell: `code`)' for the innermost frame inside the student's function."""
    code = getattr(fn, "__code__", None)
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    if not mine:
        return ""
    frame = mine[-1]
    text = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f" (line {frame.lineno} of your cell: `{text}`)" if text else f" (line {frame.lineno} of your cell)"


def _run(ex: Exercise, fn: Callable, case: Case, dtype=torch.float32) -> Outcome:
    inputs = _inputs(case, dtype)
    wrt = None
    if ex.wrt is not None:
        wrt = inputs[ex.wrt].detach().clone().requires_grad_(True)
        inputs[ex.wrt] = wrt
    try:
        out = fn(**inputs)
    except NotImplementedError:
        return Outcome(problem="not done yet: your function still raises NotImplementedError; replace the "
                               "`raise NotImplementedError()` line with your code")
    except Exception as exc:  # the student's code: any error becomes a sentence, never a traceback
        hint = ""
        if "must match the size of tensor" in str(exc) and "temperatures" in inputs:
            hint = ("; the temperatures have shape (B,): reshape them to (B, 1) (temperatures[:, None]) so that "
                    "each row is divided by its own T_n")
        return Outcome(problem=f"your function raised {type(exc).__name__}: {str(exc).strip().splitlines()[0]} "
                               f"on a case with {case.describe()}{_your_line(fn, exc)}{hint}")
    if out is None:
        return Outcome(problem="your function returns None: end it with `return ...`")
    if not isinstance(out, Tensor):
        kind = type(out).__name__
        tip = (" (do not call .item(), float() or .numpy(): autograd needs a tensor)" if ex.wrt else "")
        try:
            out = torch.as_tensor(out, dtype=torch.float64)
        except Exception:
            return Outcome(problem=f"your function returns a {kind}; return a torch tensor{tip}")
        if ex.wrt is not None:
            return Outcome(value=out, problem=f"your function returns a {kind}, not a torch tensor{tip}")
    grad = None
    if ex.wrt is not None:
        if not out.requires_grad:
            return Outcome(value=out.detach().double(),
                           problem=f"your {ex.what} does not depend on {ex.wrt} through autograd: something cut "
                                   f"it off (.detach(), .item(), numpy, torch.no_grad() or a new tensor made "
                                   f"from the values)")
        projected = out.double() if out.dim() == 0 else (out.double() * _projection(out.shape)).sum()
        (grad,) = torch.autograd.grad(projected, wrt, allow_unused=True)
        if grad is None:
            return Outcome(value=out.detach().double(),
                           problem=f"your {ex.what} does not depend on {ex.wrt}: autograd finds no path to it")
        grad = grad.double()
    return Outcome(value=out.detach().double(), grad=grad)


def _reference(ex: Exercise, case: Case) -> Outcome:
    out = _run(ex, ex.reference, case, torch.float64)
    assert out.problem is None, out.problem
    return out


def _close(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    if not torch.isfinite(a).all():
        return False
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-6)
    return bool((a - b).abs().max() <= RTOL * scale + ATOL)


def _factor_candidates(case: Case) -> Dict[str, float]:
    b, c, t = float(case.B), float(case.C), float(case.T)
    return {"T": t, "T²": t * t, "1/T": 1 / t, "1/T²": 1 / (t * t), "B": b, "1/B": 1 / b, "C": c, "1/C": 1 / c,
            "1/(BC)": 1 / (b * c), "-1": -1.0, "2": 2.0, "1/2": 0.5}


_FACTOR_WORDS = {"T": "T times too large", "T²": "T² times too large", "1/T": "T times too small",
                 "1/T²": "T² times too small", "B": "B times too large (B the batch size)",
                 "1/B": "B times too small (B the batch size)", "C": "C times too large (C the number of classes)",
                 "1/C": "C times too small (C the number of classes)",
                 "1/(BC)": "B × C times too small (it is an average over every entry)",
                 "-1": "of the wrong sign", "2": "twice too large", "1/2": "half what it should be"}


def _scale(a: Tensor, b: Tensor) -> Optional[float]:
    """s with a ≈ s b (least squares), when that fits to the tolerance; None otherwise."""
    bb = float((b * b).sum())
    if bb == 0.0:
        return None
    s = float((a * b).sum()) / bb
    scale = max(float(a.abs().max()), float(b.abs().max()) * abs(s), 1e-6)
    return s if float((a - s * b).abs().max()) <= 1e-3 * scale + 1e-7 else None


def _factor(pairs: Sequence[Tuple[Tensor, Tensor, Case]]) -> Optional[str]:
    """The name of the factor (T, 1/T², B, ...) with student = factor × reference on every case, if any."""
    scales = []
    for mine, expected, case in pairs:
        if mine is None or mine.shape != expected.shape:
            return None
        s = _scale(mine, expected)
        if s is None:
            return None
        scales.append((s, case))
    if all(abs(s - 1) < 1e-3 for s, _ in scales):
        return None
    for name in _factor_candidates(scales[0][1]):
        if all(abs(s - _factor_candidates(case)[name]) <= 2e-3 * max(1.0, abs(s)) for s, case in scales):
            return name
    return None


def _where(ex: Exercise, mine: Tensor, expected: Tensor, case: Case, what: str = "") -> str:
    """Where a tensor output differs: a group of classes (or images), and one entry."""
    scale = max(float(expected.abs().max()), 1e-6)
    bad = (mine - expected).abs() > RTOL * scale + ATOL
    text = ""
    if ex.groups is not None:
        groups = ex.groups(case)
        wrong = [name for name, mask in groups.items() if (bad & mask.reshape(bad.shape)).any()]
        if wrong and len(wrong) < len(groups):
            text = f" only for {' and '.join(wrong)}"
    index = tuple(int(i) for i in torch.nonzero(bad)[0])
    where = f"[{', '.join(map(str, index))}]"
    return (f"{text}; e.g. at {where} with {case.describe()}: yours {float(mine[index]):.4g}, expected "
            f"{float(expected[index]):.4g}")


def _compare(ex: Exercise, fn: Callable, cases: List[Case], aspects: Tuple[str, ...]) -> Tuple[bool, str]:
    """(passed, sentence) for ``fn`` on ``cases``, comparing the aspects 'values' and/or 'gradients'."""
    refs = [_reference(ex, case) for case in cases]
    outs = []
    for case, ref in zip(cases, refs):
        out = _run(ex, fn, case)
        if out.problem and out.value is None:
            return False, out.problem[0].upper() + out.problem[1:] + "."
        outs.append(out)
        if out.value.shape != ref.value.shape:
            return False, _shape_sentence(ex, out.value, ref.value, case)
    values_ok = all(_close(o.value, r.value) for o, r in zip(outs, refs))
    problems = [o.problem for o in outs if o.problem]
    grads_ok = ex.wrt is None or (not problems and all(_close(o.grad, r.grad) for o, r in zip(outs, refs)))
    if ("values" not in aspects or values_ok) and ("gradients" not in aspects or grads_ok):
        return True, ""
    if problems and values_ok:
        return False, problems[0][0].upper() + problems[0][1:] + "."
    # a known mistake?
    for mistake in ex.mistakes:
        with warnings.catch_warnings():  # a mistake's own warnings are not the student's
            warnings.simplefilter("ignore")
            theirs = [_run(ex, mistake.fn, case) for case in cases]
        if all(t.problem is None for t in theirs) and all(
                _close(o.value, t.value) and (ex.wrt is None or _close(o.grad, t.grad)) for o, t in zip(outs, theirs)):
            return False, _sentence(ex, mistake.sentence)
    # kdlib's answer times a factor?
    name = _factor([(o.value, r.value, c) for o, r, c in zip(outs, refs, cases)])
    noun = "your " + ex.what
    if name is None and values_ok and ex.wrt is not None and not problems:
        gname = _factor([(o.grad, r.grad, c) for o, r, c in zip(outs, refs, cases)])
        if gname is not None:
            return False, _sentence(ex, f"your values are right but their gradient is {_FACTOR_WORDS[gname]}")
    if name is not None:
        hint = ex.factor_hints.get(name, "")
        verb = "are" if _plural(ex.what) else "is"
        return False, _sentence(ex, f"{noun} {verb} {_FACTOR_WORDS[name]}" + (f": {hint}" if hint else ""))
    if values_ok:
        if problems:
            return False, _sentence(ex, problems[0])
        first = next(i for i, (o, r) in enumerate(zip(outs, refs)) if not _close(o.grad, r.grad))
        where = _where(ex, outs[first].grad, refs[first].grad, cases[first], "the gradient")
        return False, _sentence(ex, f"{ex.values_right_gradient_wrong}. The gradient is wrong{where}")
    if ex.wrt is not None and not problems and all(_close(o.grad, r.grad) for o, r in zip(outs, refs)):
        shift = [float(o.value.mean() - r.value.mean()) for o, r in zip(outs, refs)]
        return False, _sentence(ex, ex.gradient_right_values_wrong or
                                f"{noun} has the right gradient but not the right value (it is off by "
                                f"{shift[0]:+.4g} with {cases[0].describe()}): a term that does not depend on the "
                                f"student is added or missing")
    # where does it go wrong?
    right = [_close(o.value, r.value) for o, r in zip(outs, refs)]
    first = right.index(False)
    o, r, c = outs[first], refs[first], cases[first]
    when = ""
    temps = [case.T for case in cases]
    if any("temperature" in case.inputs for case in cases) and len(set(temps)) > 1:
        at_one = [ok for ok, case in zip(right, cases) if case.T == 1.0]
        if at_one and all(at_one) and not all(right):
            when = " It is right at T = 1 and wrong at the other temperatures: look at where T enters."
    if r.value.dim() == 0:
        return False, _sentence(ex, f"{noun} differs from kdlib's: with {c.describe()} yours is "
                                    f"{float(o.value):.6g}, expected {float(r.value):.6g}.{when}")
    verb = "differ" if _plural(ex.what) else "differs"
    return False, _sentence(ex, f"{noun} {verb} from kdlib's{_where(ex, o.value, r.value, c)}.{when}")


def _plural(noun: str) -> bool:
    """'temperatures', 'weights', 'standardised logits' (not 'loss'): the verb of the sentence."""
    return noun.endswith("s") and not noun.endswith("ss")


def _shape_sentence(ex: Exercise, mine: Tensor, expected: Tensor, case: Case) -> str:
    shape, want = tuple(mine.shape), tuple(expected.shape)
    if want == () and mine.numel() == case.B and mine.dim() == 1:
        return _sentence(ex, f"your {ex.what} has one value per sample (shape {shape}) but is one number, the "
                             f"batch mean: finish with .mean()")
    if want == () and mine.dim() == 2:
        return _sentence(ex, f"your {ex.what} has shape {shape} but is one number: sum over the classes (dim=1), "
                             f"then average over the samples")
    if len(want) == len(shape) == 2 and shape == want[::-1]:
        return _sentence(ex, f"your {ex.what} has shape {shape}, the transpose of the expected {want} "
                             f"(samples × classes)")
    return _sentence(ex, f"your {ex.what} has shape {shape}; expected {want or 'a single number'} "
                         f"with {case.describe()}")


def _sentence(ex: Exercise, text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _aspects(ex: Exercise, part: str) -> Tuple[Tuple[str, ...], Callable[[List[Case]], List[Case]]]:
    everything = ("values", "gradients") if ex.wrt is not None else ("values",)
    if part == "all":
        return everything, lambda cases: cases
    if part == "values":
        return ("values",), lambda cases: cases
    if part == "gradients":
        return ("gradients",), lambda cases: cases
    if part == "T = 1":
        return everything, lambda cases: [c for c in cases if c.T == 1.0] or cases[:1]
    raise KDLibError(f"unknown part {part!r} of exercise {ex.name!r}; parts: all, {', '.join(ex.parts)}")


def _checked(ex: Exercise, cases: List[Case], aspects: Tuple[str, ...]) -> str:
    shapes = ", ".join(f"{c.B}×{c.C}" if c.C > 1 else f"{c.B}" for c in cases)
    temps = sorted({c.T for c in cases if "temperature" in c.inputs})
    what = " and ".join("autograd gradients" if a == "gradients" else a for a in aspects)
    size = "B × C = " if cases and cases[0].C > 1 else (f"{cases[0].counts}: " if cases and cases[0].counts
                                                         else "sizes ")
    t = f"; T = {', '.join(f'{x:g}' for x in temps)}" if temps else ""
    return f"{what} agree with {ex.reference_name} on {len(cases)} random cases ({size}{shapes}{t})"


def evaluate(name: str, fn: Callable, seed: int = CHECK_SEED, part: str = "all") -> Verdict:
    """Check ``fn`` against exercise ``name`` on the cases of ``seed``; ``part`` restricts what is compared."""
    ex = get(name)
    if not callable(fn):
        return Verdict(name, False, f"Pass your function itself, e.g. exercises.check({name!r}, {name}); got "
                                    f"a {type(fn).__name__}.")
    aspects, select = _aspects(ex, part)
    cases = select(ex.cases(seed))
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = list(ex.args)
    missing = [a for a in ex.args if a not in params]
    if missing and not any(inspect.Parameter.VAR_KEYWORD == p.kind
                           for p in inspect.signature(fn).parameters.values()):
        return Verdict(name, False, f"Your function's arguments are ({', '.join(params)}); the exercise calls "
                                    f"{ex.signature} by name: keep those argument names.")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait for each other on a busy machine
    try:
        passed, message = _compare(ex, fn, cases, aspects)
    finally:
        torch.set_num_threads(threads)
    checked = _checked(ex, cases, aspects)
    return Verdict(name, passed, (checked[0].upper() + checked[1:] + ".") if passed else message, checked)


def check(name: str, fn: Callable, seed: int = CHECK_SEED) -> Verdict:
    """The check cell of an exercise: shows ✔ or ✘ with one sentence; never raises for the student's errors."""
    return evaluate(name, fn, seed=seed)


def grade(name: str, fn: Callable, part: str = "all", seed: int = 1) -> Verdict:
    """The autograder's test: :func:`evaluate`, raising :class:`ExerciseFailed` with the sentence if wrong."""
    verdict = evaluate(name, fn, seed=seed, part=part)
    if not verdict.passed:
        raise ExerciseFailed(f"{name} ({part}): {verdict.message}")
    return verdict


def stub(name: str) -> Callable:
    """The untouched exercise: a function with the exercise's arguments that raises NotImplementedError."""
    ex = get(name)

    def untouched(*args, **kwargs):
        raise NotImplementedError()

    untouched.__signature__ = inspect.Signature([inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                 for a in ex.args])
    return untouched
