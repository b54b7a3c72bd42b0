"""Bilevel loss weightings: Auto-Lambda, MOML and FORUM.

The task weights are *upper-level* variables chosen so that the model, trained on the weighted
training loss (the *lower level*), does well on an auxiliary batch. Before each step the strategy
calls :meth:`~mtlkit.methods.base.Method.prepare` with a :class:`~mtlkit.methods.base.StepProbe`:
the training batch, ``extra_batches = 1`` auxiliary batch, the parameters the step updates
(shared + the step's heads), the model optimizer's learning rate, and ``losses(batch)`` at the
current parameters. The method takes virtual steps on those parameters in place, evaluates
losses there, restores the parameters bit-exactly (:class:`ParameterSnapshot`), and updates its
weights with its *own* optimizer; ``forward`` then returns them detached.

The auxiliary ("validation") batch comes from a separately shuffled stream over the *training*
split (the Trainer's ``BatchStream``), one per step. This is what Auto-Lambda's code does (a second
``DataLoader`` over the training set, ``shuffle=True``); MOML's and FORUM's code draw the lower-
and upper-level batches as two consecutive batches of the training loader and then train the
model on both (halving the steps per epoch), while here the model step uses the training batch
only and every step also consumes one auxiliary batch.

The probe's forward passes run in the model's current mode: batch-norm running statistics see
them (as in the papers' code); the two passes of a finite difference share their random numbers.

The upper-level variables are buffers (``upper``), not parameters: ``parameters()`` is empty, so
the model optimizer (built from ``model.parameters() + method.parameters()``) never sees them.
They and the own optimizer's state are saved by ``state_dict`` and cleared by ``reset``.

One module per method: :mod:`~mtlkit.methods.bilevel.auto_lambda` (with
:func:`central_difference`, its finite-difference Hessian-vector product),
:mod:`~mtlkit.methods.bilevel.moml` (with :func:`unrolled_hypergradient`, the exact one-step
hypergradient from two Jacobians) and :mod:`~mtlkit.methods.bilevel.forum` (with
:func:`forum_qp`, its constrained multi-gradient problem, solved by
:func:`~mtlkit.methods.solvers.interior_point_qp`); what they share is in
:mod:`~mtlkit.methods.bilevel.common` (:class:`BilevelWeighting`, :class:`ParameterSnapshot`:
virtual parameters, exact restore, :func:`flat_gradient`, :func:`shift_parameters`: a virtual SGD
step, :func:`softmax_jacobian`).
"""

from __future__ import annotations

from mtlkit.methods.bilevel.auto_lambda import AutoLambda, central_difference
from mtlkit.methods.bilevel.common import (
    BilevelWeighting,
    ParameterSnapshot,
    flat_gradient,
    shift_parameters,
    softmax_jacobian,
)
from mtlkit.methods.bilevel.forum import FORUM, FORUM_GUARD, forum_qp
from mtlkit.methods.bilevel.moml import MOML, MomlNormalization, unrolled_hypergradient

__all__ = [
    "FORUM",
    "FORUM_GUARD",
    "MOML",
    "AutoLambda",
    "BilevelWeighting",
    "MomlNormalization",
    "ParameterSnapshot",
    "central_difference",
    "flat_gradient",
    "forum_qp",
    "shift_parameters",
    "softmax_jacobian",
    "unrolled_hypergradient",
]
