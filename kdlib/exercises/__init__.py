r"""Code exercises that check themselves: the student writes a piece of a method, kdlib says whether it is right.

Each exercise of the book is a function the student writes in a code cell (a loss or one of its terms, an
analytic gradient, a weighting rule, a temperature rule), followed by a check cell::

    exercises.check("kd_loss", kd_loss)

The check calls the student's function on random logits at several batch sizes, class counts and
temperatures, and compares it with kdlib's own function (the one the training engine uses): the values,
and, for a loss, its autograd gradient with respect to the student's logits. It never raises: it shows a
verdict, and when the answer is wrong one sentence a student can act on, found in this order:

1. the function is still the stub (``raise NotImplementedError``) or raises: what to do, with the line;
2. it returns the wrong kind of thing (a float, a numpy array, a wrong shape): what shape is expected;
3. it agrees with a *known mistake* of this exercise (softmax over the batch, KL the wrong way round, the
   label not masked, the Top-K of the teacher, ...): that mistake's sentence;
4. it is kdlib's answer times a factor that follows the case: T, T², 1/T, B, 1/C, -1, ... ("your gradient
   is T times too large"), with the exercise's hint for that factor;
5. the values agree and the gradients do not (or the reverse): what that means for this exercise;
6. otherwise where it differs: at which temperatures, and for tensors in which group of classes (the
   label's column, the Top-K, ...), with one entry yours against the expected one.

A correct solution written any other way passes (float32 arithmetic is compared with a float64 reference at
a relative tolerance of 1e-4). The grader (``make course``, nbgrader) calls :func:`grade`, which raises
:class:`ExerciseFailed` with the same sentence, on cases drawn from a seed the student does not see.
"""
from kdlib.exercises.core import (EXERCISES, Exercise, ExerciseFailed, Verdict, check, evaluate, for_chapter, get,
                                  grade, names, stub)
# one module per chapter; importing registers its exercises, in the book's order
from kdlib.exercises import kd, dkd, cwkd, clkd, rekd, aekt, dlkd, logit_family  # noqa: E402,F401

__all__ = ["EXERCISES", "Exercise", "ExerciseFailed", "Verdict", "check", "evaluate", "for_chapter", "get", "grade",
           "names", "stub"]
