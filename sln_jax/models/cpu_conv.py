"""A convolution whose kernel gradient XLA:CPU computes as matrix products.

``conv_general_dilated`` takes ``lax.conv_general_dilated``'s arguments
(Flax's ``nn.Conv(conv_general_dilated=...)`` hook) and returns the same
output. On the CPU backend, for a 2-D NHWC/HWIO convolution without groups
or input dilation where it pays (``_pays``: a kernel gradient of at least
``MIN_GFLOP``, and for kernels wider than 1x1 at least ``MIN_CHANNELS``
channels in and out), its VJP computes the kernel gradient tap by tap:

  dW[i, j] = sum over (b, y, x) of X_pad[b, y*sy + i*dy, x*sx + j*dx, :]^T
             dY[b, y, x, :]

one (C_in, C_out) matrix product per kernel tap (a ``lax.map`` over the
taps, so one strided window of the padded input exists at a time),
accumulated in float32, instead of XLA:CPU's kernel-gradient convolution,
which runs far below XLA:CPU's forward-convolution rate (docs/benchmarks.md).
The input gradient is jax's own (the transposed convolution) and the
forward pass is ``lax.conv_general_dilated`` itself, so inference is XLA's
bit for bit; the kernel gradient differs from XLA's only by float32
summation order.

Small or narrow convolutions (all of the synthetic and test configs') keep
XLA's kernel gradient, as do other backends (cuDNN / TPU convolutions) and
convolutions outside those cases. XLA's cost analysis counts a loop's body
once, so FLOP counts come from a program traced inside
``xla_kernel_gradients()`` (``scripts/benchmark.py`` does).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')
MIN_GFLOP = 1.0  # kernel-gradient GFLOP (2 * B * OH * OW * kh * kw * C_in * C_out)
MIN_CHANNELS = 256  # kernels wider than 1x1: min(C_in, C_out)
_ENABLED = [True]
_TRACED = [0]  # convolutions traced on the matrix-product path so far

Pads = tuple[tuple[int, int], tuple[int, int]]


def traced_count() -> int:
  """How many convolutions this process has traced on the matrix-product
  path (a trace-time count: compare before and after tracing a step)."""
  return _TRACED[0]


@contextlib.contextmanager
def xla_kernel_gradients() -> Iterator[None]:
  """Within: ``conv_general_dilated`` is ``lax.conv_general_dilated`` on
  every backend (for models traced inside; jax caches traces per function)."""
  _ENABLED.append(False)
  try:
    yield
  finally:
    _ENABLED.pop()


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
  """``lax.conv_general_dilated``, with the matrix-product kernel gradient
  on XLA:CPU (module docstring)."""
  plain = functools.partial(
      lax.conv_general_dilated,
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
  )
  if (
      not _ENABLED[-1]
      or jax.default_backend() != 'cpu'
      or jnp.ndim(lhs) != 4
      or feature_group_count != 1
      or batch_group_count != 1
      or preferred_element_type is not None
      or any(d != 1 for d in (lhs_dilation or (1, 1)))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  ):
    return plain(lhs, rhs)
  if not _pays(rhs.shape, jax.eval_shape(plain, lhs, rhs).shape):
    return plain(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    window = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation))
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  _TRACED[0] += 1
  return _conv(lhs, rhs, strides, pads, dilation, precision)


def _pays(rhs_shape, out_shape) -> bool:
  """Whether the matrix-product kernel gradient is worth it: at least
  ``MIN_GFLOP``, and for kernels wider than 1x1 at least ``MIN_CHANNELS``
  in and out channels, where it measured faster (docs/benchmarks.md). The
  backbone's 64- and 128-channel 3x3 convolutions keep XLA's kernel
  gradient. The mask head's 256-channel 3x3s on 14x14 maps pass the rule;
  a rule that leaves them out makes no difference to the training step
  beyond noise (docs/benchmarks.md)."""
  kh, kw, cin, cout = rhs_shape
  if 2 * math.prod(out_shape) * kh * kw * cin < MIN_GFLOP * 1e9:
    return False
  return kh * kw == 1 or min(cin, cout) >= MIN_CHANNELS


def _forward(lhs, rhs, strides, pads, dilation, precision):
  return lax.conv_general_dilated(
      lhs, rhs, strides, pads, rhs_dilation=dilation, dimension_numbers=_NHWC, precision=precision
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(lhs, rhs, strides, pads, dilation, precision):
  return _forward(lhs, rhs, strides, pads, dilation, precision)


def _conv_fwd(lhs, rhs, strides, pads, dilation, precision):
  return _forward(lhs, rhs, strides, pads, dilation, precision), (lhs, rhs)


def _conv_bwd(strides, pads, dilation, precision, residuals, g):
  lhs, rhs = residuals
  _, input_vjp = jax.vjp(lambda x: _forward(x, rhs, strides, pads, dilation, precision), lhs)
  (d_lhs,) = input_vjp(g)
  d_rhs = kernel_gradient(lhs, g, rhs.shape[:2], strides, pads, dilation)
  return d_lhs, d_rhs.astype(rhs.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def kernel_gradient(
    lhs: jax.Array,
    g: jax.Array,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Pads,
    dilation: Sequence[int],
) -> jax.Array:
  """dL/dW (kh, kw, C_in, C_out) float32 of an NHWC/HWIO convolution.

  Args:
    lhs: (B, H, W, C_in) input; g: (B, OH, OW, C_out) output cotangent.
    kernel: (kh, kw); strides, dilation: per spatial axis; pads: ((top,
      bottom), (left, right)), negative values crop as in lax.
  """
  b, _, _, cin = lhs.shape
  oh, ow = g.shape[1:3]
  if oh == 0 or ow == 0:  # the kernel covers no output position
    return jnp.zeros(tuple(kernel) + (cin, g.shape[3]), jnp.float32)
  strides = tuple(strides)
  x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  span = (b, (oh - 1) * strides[0] + 1, (ow - 1) * strides[1] + 1, cin)

  def tap(t):
    i, j = t // kernel[1], t % kernel[1]
    window = lax.dynamic_slice(x, (0, i * dilation[0], j * dilation[1], 0), span)
    if strides != (1, 1):
      window = window[:, :: strides[0], :: strides[1]]
    return jnp.einsum('bhwc,bhwd->cd', window, g, preferred_element_type=jnp.float32)

  if kernel[0] * kernel[1] == 1:
    return tap(0)[None, None]
  out = lax.map(tap, jnp.arange(kernel[0] * kernel[1]))
  return out.reshape(tuple(kernel) + out.shape[1:])
