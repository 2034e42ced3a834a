// The mutex_attn operator library: op schemas (one place) and the tiny _C Python module whose
// only job is to load this library into the process. Kernels register themselves per device
// in cpu/ and cuda/ with TORCH_LIBRARY_IMPL; autograd and fake kernels are registered from
// Python (mutex_attn/backends/native.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mutex_attn._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Row statistics travel between ops as [N, C] tensors in the compute dtype (float32, or float64
// for float64 inputs): row_max = max (x − y)², row_sum = Σ e^((x − y)² − row_max),
// argmax = first position of max(mix) (int64). See row_math.h for the formulas.
TORCH_LIBRARY(mutex_attn, m) {
  // MAB alone: forward keeps the softmax statistics so that backward need not recompute them.
  m.def("mab_forward(Tensor x, Tensor y) -> (Tensor am, Tensor row_max, Tensor row_sum)");
  m.def("mab_backward(Tensor dam, Tensor x, Tensor y, Tensor row_max, Tensor row_sum)"
        " -> (Tensor dx, Tensor dy)");
  // FAB pieces: pooling (mean + max of am + y) and the channel-wise blend.
  m.def("fab_pool(Tensor am, Tensor y) -> (Tensor v, Tensor argmax)");
  m.def("fab_pool_backward(Tensor dv, Tensor argmax, Tensor like) -> Tensor");
  m.def("fab_blend(Tensor am, Tensor y, Tensor gate) -> Tensor");
  m.def("fab_blend_backward(Tensor dout, Tensor am, Tensor y, Tensor gate)"
        " -> (Tensor dam, Tensor dy, Tensor dgate)");
  // Fused MutexAttention (SPEC §1 pass structure K1..K4); d, A, am and mix are never stored.
  m.def("mutex_attention_stats(Tensor x, Tensor y)"
        " -> (Tensor v, Tensor row_max, Tensor row_sum, Tensor argmax)");
  m.def("mutex_attention_apply(Tensor x, Tensor y, Tensor gate, Tensor row_max, Tensor row_sum)"
        " -> Tensor");
  m.def("mutex_attention_backward_stats(Tensor dout, Tensor x, Tensor y, Tensor row_max,"
        " Tensor row_sum, Tensor argmax) -> Tensor");
  m.def("mutex_attention_backward_apply(Tensor dout, Tensor x, Tensor y, Tensor gate, Tensor dv,"
        " Tensor row_max, Tensor row_sum, Tensor argmax, Tensor backward_stats)"
        " -> (Tensor dx, Tensor dy)");
}
