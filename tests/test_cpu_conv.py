"""cpu_conv: lax.conv_general_dilated with a matrix-product kernel gradient on XLA:CPU.

The forward pass and the input gradient must match XLA's own convolution
and its VJP (jax's transpose rules) bit for bit. The kernel gradient is
checked against a float64 numpy reference (tap-by-tap sums of the padded
input's strided windows times the cotangent) to float32 summation order:
XLA:CPU's own kernel gradient is wrong where an axis is cropped on one side
and padded on the other (padding (-1, 1) at stride 1 gives errors of 3 to
1e33, changing from run to run), so it cannot serve as the reference for
negative padding. The model itself pads only with non-negative amounts.
"""

import contextlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sln_jax.models import cpu_conv

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu', reason='the matrix-product path is XLA:CPU only'
)

DN = ('NHWC', 'HWIO', 'NHWC')


@contextlib.contextmanager
def _every_convolution():
  """Within: the matrix-product path takes any size and width (the tests'
  convolutions are far below the rule's thresholds)."""
  old = cpu_conv.MIN_GFLOP, cpu_conv.MIN_CHANNELS
  cpu_conv.MIN_GFLOP, cpu_conv.MIN_CHANNELS = 0.0, 0
  try:
    yield
  finally:
    cpu_conv.MIN_GFLOP, cpu_conv.MIN_CHANNELS = old


def _vjps(x, w, g, stride, padding, dilation):
  ref = lambda a, b: jax.lax.conv_general_dilated(
      a, b, stride, padding, rhs_dilation=dilation, dimension_numbers=DN
  )
  new = lambda a, b: cpu_conv.conv_general_dilated(
      a,
      b,
      stride,
      padding,
      rhs_dilation=dilation,
      dimension_numbers=jax.lax.conv_dimension_numbers(a.shape, b.shape, DN),
  )
  run = lambda f: jax.jit(lambda a, b, c: (f(a, b),) + jax.vjp(f, a, b)[1](c))(x, w, g)
  return run(ref), run(new)


def _case(rng, batch, size, cin, cout, kernel, stride, padding, dilation, dtype=jnp.float32):
  x = jnp.asarray(rng.normal(size=(batch, size, size + 1, cin)), dtype)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) * 0.1, dtype)
  out = jax.eval_shape(
      lambda a, b: jax.lax.conv_general_dilated(
          a, b, stride, padding, rhs_dilation=dilation, dimension_numbers=DN
      ),
      x,
      w,
  )
  g = jnp.asarray(rng.normal(size=out.shape), dtype)
  return x, w, g


def _numpy_kernel_gradient(x, g, kernel, stride, padding, dilation):
  """dL/dW (kh, kw, C_in, C_out) in float64 from NHWC x and cotangent g;
  padding ((top, bottom), (left, right)) pads positive and crops negative
  amounts, as lax.pad does."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  if isinstance(padding, str):
    window = [(kernel - 1) * d + 1 for d in dilation]
    padding = jax.lax.padtype_to_pads(x.shape[1:3], window, stride, padding)
  x = np.pad(x, [(0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in padding] + [(0, 0)])
  (top, bottom), (left, right) = padding
  x = x[:, max(-top, 0) : x.shape[1] - max(-bottom, 0), max(-left, 0) : x.shape[2] - max(-right, 0)]
  oh, ow = g.shape[1:3]
  dw = np.zeros((kernel, kernel, x.shape[3], g.shape[3]))
  if oh == 0 or ow == 0:
    return dw
  for i in range(kernel):
    for j in range(kernel):
      y0, x0 = i * dilation[0], j * dilation[1]
      window = x[
          :,
          y0 : y0 + (oh - 1) * stride[0] + 1 : stride[0],
          x0 : x0 + (ow - 1) * stride[1] + 1 : stride[1],
      ]
      dw[i, j] = np.einsum('bhwc,bhwd->cd', window, g)
  return dw


def _check(ref, new, geometry, rtol=2e-6):
  """y and dx bit-equal to XLA's; dw to the numpy reference within rtol of
  its largest magnitude (float32 or bfloat16 summation order)."""
  (y_ref, dx_ref, dw_xla), (y, dx, dw) = ref, new
  x, g, kernel, stride, padding, dilation = geometry
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
  assert dw.dtype == dw_xla.dtype and dw.shape == dw_xla.shape
  dw_ref = _numpy_kernel_gradient(x, g, kernel, stride, padding, dilation)
  np.testing.assert_allclose(
      np.asarray(dw, np.float64), dw_ref, rtol=0, atol=rtol * max(np.abs(dw_ref).max(), 1e-30)
  )


@pytest.mark.parametrize(
    'kernel,stride,padding,dilation',
    [
        (1, (1, 1), 'VALID', (1, 1)),
        (1, (2, 2), 'VALID', (1, 1)),
        (3, (1, 1), 'SAME', (1, 1)),
        (3, (1, 1), ((1, 1), (1, 1)), (1, 1)),
        (3, (2, 2), ((0, 1), (0, 1)), (1, 1)),  # the release's TF-SAME stride 2
        (3, (1, 1), ((2, 2), (2, 2)), (2, 2)),  # atrous
        (7, (2, 2), ((3, 3), (3, 3)), (1, 1)),  # the stem
        (3, (1, 2), ((1, -1), (0, 2)), (2, 1)),  # uneven: crop, asymmetric
    ],
)
def test_matches_xla_convolution_and_its_vjp(kernel, stride, padding, dilation):
  rng = np.random.default_rng(kernel * 10 + stride[0])
  x, w, g = _case(rng, 2, 13, 5, 4, kernel, stride, padding, dilation)
  before = cpu_conv.traced_count()
  with _every_convolution():
    ref, new = _vjps(x, w, g, stride, padding, dilation)
  assert cpu_conv.traced_count() > before  # the matrix-product path ran
  _check(ref, new, (x, g, kernel, stride, padding, dilation))


def test_bfloat16_kernel_gradient_keeps_the_dtype():
  x, w, g = _case(np.random.default_rng(3), 2, 16, 8, 8, 3, (1, 1), 'SAME', (1, 1), jnp.bfloat16)
  with _every_convolution():
    ref, new = _vjps(x, w, g, (1, 1), 'SAME', (1, 1))
  _check(ref, new, (x, g, 3, (1, 1), 'SAME', (1, 1)), rtol=2e-2)  # one bf16 rounding


@hypothesis.settings(max_examples=25, deadline=None)
# Found while exploring: an empty output (the cropped input is shorter than
# the dilated kernel), and XLA's wrong kernel gradient at padding (-1, 1).
@hypothesis.example(kernel=3, stride=(2, 1), dilation=(2, 1), pads=[-1, -1, 0, 0], size=6, seed=0)
@hypothesis.example(
    kernel=2, stride=(1, 1), dilation=(2, 2), pads=[-1, 1, 0, 0], size=11, seed=54073
)
@hypothesis.given(
    kernel=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pads=st.lists(st.integers(-1, 2), min_size=4, max_size=4),
    size=st.integers(6, 11),
    seed=st.integers(0, 2**16),
)
def test_any_geometry_matches_xla(kernel, stride, dilation, pads, size, seed):
  padding = ((pads[0], pads[1]), (pads[2], pads[3]))
  x, w, g = _case(np.random.default_rng(seed), 1, size, 3, 2, kernel, stride, padding, dilation)
  with _every_convolution():
    ref, new = _vjps(x, w, g, stride, padding, dilation)
  _check(ref, new, (x, g, kernel, stride, padding, dilation))


def test_small_convolutions_other_backends_and_the_switch_keep_xla(monkeypatch):
  rng = np.random.default_rng(0)
  x, w, g = _case(rng, 2, 13, 5, 4, 3, (1, 1), 'SAME', (1, 1))
  before = cpu_conv.traced_count()
  ref, new = _vjps(x, w, g, (1, 1), 'SAME', (1, 1))  # far below MIN_GFLOP
  assert cpu_conv.traced_count() == before
  for a, b in zip(ref, new):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with _every_convolution():
    with cpu_conv.xla_kernel_gradients():
      _vjps(x, w, g, (1, 1), 'SAME', (1, 1))
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    _vjps(x, w, g, (1, 1), 'SAME', (1, 1))
  assert cpu_conv.traced_count() == before


def test_the_layers_that_gain_take_the_matrix_product_path():
  """The rule admits the full model's layers that measured faster (C4's 1x1
  convolutions, the 256-channel 3x3 ones on P2 at a 1024 canvas) and leaves
  narrow 3x3 ones (64-channel C2 at 1024) and the synthetic config's alone."""

  def takes(x_shape, kernel, cin, cout):
    x = jax.ShapeDtypeStruct(x_shape + (cin,), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, cin, cout), jnp.float32)
    before = cpu_conv.traced_count()
    jax.eval_shape(
        lambda a, b: cpu_conv.conv_general_dilated(
            a,
            b,
            (1, 1),
            'SAME',
            dimension_numbers=jax.lax.conv_dimension_numbers(a.shape, b.shape, DN),
        ),
        x,
        w,
    )
    return cpu_conv.traced_count() > before

  assert takes((1, 64, 64), 1, 1024, 256)  # C4 conv1
  assert takes((1, 256, 256), 3, 256, 512)  # RPN shared conv on P2
  assert not takes((1, 256, 256), 3, 64, 64)  # C2 conv2: narrow
  assert not takes((10, 32, 32), 3, 64, 512)  # synthetic RPN: narrow
  assert not takes((10, 32, 32), 1, 64, 256)  # synthetic 1x1: small
