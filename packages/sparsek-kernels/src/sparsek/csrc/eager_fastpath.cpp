// Compiled fast path of eager dense `sparsek.attention` calls with a cached launch plan (see sparsek/_dense_plans.py).
//
// A Python extension module built against the running PyTorch (sparsek/build.py, `build_eager_fastpath`). It keeps the
// same plans as `_dense_plans` under a key of the call's shapes, strides, dtypes, devices and options, and on a hit
// allocates the output, writes the five data pointers in front of the stored kernel parameters and calls the kernel
// library's `sk_fmha_fwd` through its address: the work the Python plan path does, without the interpreter (an eager
// call's host time is what bounds latency-sized problems). Anything it does not recognise returns None, and the
// caller takes the checked Python path, which raises the usual errors.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using LaunchFn = int (*)(const char* params, void* stream);
using ErrorStringFn = const char* (*)(int code);

constexpr int kPointerBytes = 5 * 8;  // q, k, v, o, lse at the front of SkFmhaParams
constexpr size_t kMaxPlans = 512;     // as _dense_plans.MAX_PLANS: emptied when full

// Every field is written (the struct is zeroed first), so keys compare and hash as bytes.
struct Key {
  int64_t sizes[3][4];
  int64_t strides[3][4];
  int64_t window[2];
  double scale;
  int16_t device_index[3];
  int8_t device_type[3];
  int8_t dtype[3];
  int8_t causal, return_lse, layout, has_scale, has_window;
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    const auto* b = reinterpret_cast<const unsigned char*>(&k);
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ b[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

struct KeyEq {
  bool operator()(const Key& a, const Key& b) const { return std::memcmp(&a, &b, sizeof(Key)) == 0; }
};

struct Plan {
  LaunchFn launch;
  ErrorStringFn error_string;
  int device_index;
  std::vector<int64_t> out_size, out_stride, lse_size;
  bool has_lse;
  std::string params;  // the whole packed SkFmhaParams; the pointers are overwritten per call
};

std::unordered_map<Key, Plan, KeyHash, KeyEq> g_plans;
PyObject* g_stream_of = nullptr;     // callable: device index -> raw stream handle (int)
PyObject* g_current_device = nullptr;  // callable: () -> current CUDA device index
bool g_cpu_for_tests = false;        // accept CPU tensors (the CPU tests drive the path with a stand-in launch)

// Keys exist for functorch / Python-subclass / functionalization wrappers; such tensors take the Python path.
const c10::DispatchKeySet kWrapperKeys({c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                        c10::DispatchKey::Functionalize, c10::DispatchKey::Python,
                                        c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::BatchedNestedTensor});

// A plain strided 4-D tensor without autograd the kernel can read as is, or nullptr.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.dim() != 4 || t.layout() != at::kStrided || t.requires_grad() || t.is_neg() || t.is_conj())
    return nullptr;
  if (!(t.is_cuda() || (g_cpu_for_tests && t.is_cpu()))) return nullptr;
  if (t.key_set().has_any(kWrapperKeys)) return nullptr;
  return &t;
}

// Fills `key` from the call's arguments; false when an argument is not a plain value of the expected type (such
// calls are not cached, as in `_dense_plans.plan_key`).
bool make_key(PyObject* const* args, Key* key, const at::Tensor** tensors) {
  std::memset(key, 0, sizeof(Key));
  for (int i = 0; i < 3; ++i) {
    const at::Tensor* t = plain_tensor(args[i]);
    if (t == nullptr) return false;
    tensors[i] = t;
    const auto sizes = t->sizes();
    const auto strides = t->strides();
    for (int d = 0; d < 4; ++d) {
      key->sizes[i][d] = sizes[d];
      key->strides[i][d] = strides[d];
    }
    key->dtype[i] = static_cast<int8_t>(t->scalar_type());
    key->device_type[i] = static_cast<int8_t>(t->device().type());
    key->device_index[i] = t->device().index();
  }
  PyObject *causal = args[3], *scale = args[4], *window = args[5], *layout = args[6], *return_lse = args[7];
  if (!PyBool_Check(causal) || !PyBool_Check(return_lse)) return false;
  key->causal = causal == Py_True;
  key->return_lse = return_lse == Py_True;
  if (scale != Py_None) {
    if (PyFloat_CheckExact(scale)) {
      key->scale = PyFloat_AS_DOUBLE(scale);
    } else if (PyLong_CheckExact(scale)) {
      key->scale = PyLong_AsDouble(scale);
      if (key->scale == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
      }
    } else {
      return false;
    }
    key->has_scale = 1;
  }
  if (window != Py_None) {
    if (!PyTuple_CheckExact(window) || PyTuple_GET_SIZE(window) != 2) return false;
    for (int i = 0; i < 2; ++i) {
      PyObject* w = PyTuple_GET_ITEM(window, i);
      if (!PyLong_CheckExact(w)) return false;
      int overflow = 0;
      key->window[i] = PyLong_AsLongLongAndOverflow(w, &overflow);
      if (overflow || (key->window[i] == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return false;
      }
    }
    key->has_window = 1;
  }
  if (!PyUnicode_CheckExact(layout)) return false;
  if (PyUnicode_CompareWithASCIIString(layout, "bshd") == 0) {
    key->layout = 0;
  } else if (PyUnicode_CompareWithASCIIString(layout, "bhsd") == 0) {
    key->layout = 1;
  } else {
    return false;
  }
  return true;
}

bool parse_int64_tuple(PyObject* obj, std::vector<int64_t>* out) {
  PyObject* seq = PySequence_Fast(obj, "expected a sequence of ints");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  out->resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    (*out)[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if ((*out)[i] == -1 && PyErr_Occurred()) {
      Py_DECREF(seq);
      return false;
    }
  }
  Py_DECREF(seq);
  return true;
}

// call(q, k, v, causal, scale, window, layout, return_lse) -> out | (out, lse) | None
PyObject* fast_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "call() takes q, k, v, causal, scale, window, layout, return_lse");
    return nullptr;
  }
  HANDLE_TH_ERRORS
  Key key;
  const at::Tensor* t[3];
  if (g_plans.empty() || !make_key(args, &key, t)) Py_RETURN_NONE;
  // Active Python modes (a TorchDispatchMode such as FakeTensorMode, a TorchFunctionMode) must see the allocation
  // as the Python path makes it.
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::PythonTorchFunctionTLS::stack_len() > 0)
    Py_RETURN_NONE;
  const auto it = g_plans.find(key);
  if (it == g_plans.end()) Py_RETURN_NONE;
  const Plan& plan = it->second;
  void* stream = nullptr;
  if (plan.device_index >= 0) {  // a CUDA plan: the tensors' GPU must be the current one (else the Python path)
    if (g_current_device == nullptr || g_stream_of == nullptr) Py_RETURN_NONE;  // not configured
    PyObject* cur = PyObject_CallNoArgs(g_current_device);
    if (cur == nullptr) return nullptr;
    const long current = PyLong_AsLong(cur);
    Py_DECREF(cur);
    if (current == -1 && PyErr_Occurred()) return nullptr;
    if (current != plan.device_index) Py_RETURN_NONE;
    PyObject* index = PyLong_FromLong(plan.device_index);
    if (index == nullptr) return nullptr;
    PyObject* s = PyObject_CallOneArg(g_stream_of, index);
    Py_DECREF(index);
    if (s == nullptr) return nullptr;
    stream = PyLong_AsVoidPtr(s);
    Py_DECREF(s);
    if (stream == nullptr && PyErr_Occurred()) return nullptr;
  }
  const at::Tensor& q = *t[0];
  at::Tensor out = at::empty_strided(plan.out_size, plan.out_stride, q.options()), lse;  // errors: see the end
  if (plan.has_lse) lse = at::empty(plan.lse_size, q.options().dtype(at::kFloat));
  // The packed parameters: the plan's bytes with this call's five pointers in front.
  alignas(8) char params[1024];
  const size_t n = plan.params.size();
  std::memcpy(params, plan.params.data(), n);
  const uint64_t ptrs[5] = {reinterpret_cast<uint64_t>(t[0]->data_ptr()), reinterpret_cast<uint64_t>(t[1]->data_ptr()),
                            reinterpret_cast<uint64_t>(t[2]->data_ptr()), reinterpret_cast<uint64_t>(out.data_ptr()),
                            plan.has_lse ? reinterpret_cast<uint64_t>(lse.data_ptr()) : 0};
  std::memcpy(params, ptrs, kPointerBytes);
  const int code = plan.launch(params, stream);
  if (code != 0) {
    const char* what = plan.error_string ? plan.error_string(code) : "unknown error";
    PyErr_Format(PyExc_RuntimeError, "sparsek fmha forward failed: %s (code %d)", what, code);
    return nullptr;
  }
  PyObject* py_out = THPVariable_Wrap(std::move(out));
  if (!plan.has_lse || py_out == nullptr) return py_out;
  PyObject* py_lse = THPVariable_Wrap(std::move(lse));
  if (py_lse == nullptr) {
    Py_DECREF(py_out);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, py_out, py_lse);
  Py_DECREF(py_out);
  Py_DECREF(py_lse);
  return pair;
  END_HANDLE_TH_ERRORS  // PyTorch's errors (e.g. out of memory) as the Python exceptions PyTorch raises
}

// store(q, k, v, causal, scale, window, layout, return_lse, launch_address, error_string_address, device_index,
//       out_size, out_stride, lse_size or None, params) -> bool (False: the arguments are not cacheable)
PyObject* fast_store(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 15) {
    PyErr_SetString(PyExc_TypeError, "store() takes 15 arguments");
    return nullptr;
  }
  Key key;
  const at::Tensor* t[3];
  if (!make_key(args, &key, t)) Py_RETURN_FALSE;
  Plan plan;
  plan.launch = reinterpret_cast<LaunchFn>(PyLong_AsVoidPtr(args[8]));
  if (plan.launch == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "launch_address must be a non-zero address");
    return nullptr;
  }
  plan.error_string = reinterpret_cast<ErrorStringFn>(PyLong_AsVoidPtr(args[9]));
  if (plan.error_string == nullptr && PyErr_Occurred()) return nullptr;
  plan.device_index = static_cast<int>(PyLong_AsLong(args[10]));
  if (plan.device_index == -1 && PyErr_Occurred()) return nullptr;
  if (!parse_int64_tuple(args[11], &plan.out_size) || !parse_int64_tuple(args[12], &plan.out_stride)) return nullptr;
  plan.has_lse = args[13] != Py_None;
  if (plan.has_lse && !parse_int64_tuple(args[13], &plan.lse_size)) return nullptr;
  char* bytes = nullptr;
  Py_ssize_t len = 0;
  if (PyBytes_AsStringAndSize(args[14], &bytes, &len) != 0) return nullptr;
  if (len < kPointerBytes || len > 1024) {
    PyErr_SetString(PyExc_ValueError, "params must be the packed SkFmhaParams");
    return nullptr;
  }
  plan.params.assign(bytes, static_cast<size_t>(len));
  if (g_plans.size() >= kMaxPlans) g_plans.clear();
  g_plans[key] = std::move(plan);
  Py_RETURN_TRUE;
}

// configure(current_device, stream_of, cpu_for_tests)
PyObject* fast_configure(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "configure(current_device, stream_of, cpu_for_tests)");
    return nullptr;
  }
  Py_INCREF(args[0]);
  Py_XSETREF(g_current_device, args[0]);
  Py_INCREF(args[1]);
  Py_XSETREF(g_stream_of, args[1]);
  g_cpu_for_tests = PyObject_IsTrue(args[2]) == 1;
  g_plans.clear();
  Py_RETURN_NONE;
}

PyObject* fast_clear(PyObject*, PyObject*) {
  g_plans.clear();
  Py_RETURN_NONE;
}

// A launch function that launches nothing (host-overhead benchmarks on machines without a GPU).
int noop_launch(const char*, void*) { return 0; }

PyObject* fast_noop_address(PyObject*, PyObject*) { return PyLong_FromVoidPtr(reinterpret_cast<void*>(&noop_launch)); }

PyMethodDef kMethods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_call)), METH_FASTCALL,
     "call(q, k, v, causal, scale, window, layout, return_lse): the planned launch, or None."},
    {"store", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_store)), METH_FASTCALL,
     "Keep a plan for calls with these arguments."},
    {"configure", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_configure)), METH_FASTCALL,
     "configure(current_device, stream_of, cpu_for_tests); forgets every plan."},
    {"clear", fast_clear, METH_NOARGS, "Forget every plan."},
    {"noop_launch_address", fast_noop_address, METH_NOARGS, "Address of a launch function that does nothing."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_sparsek_eager", "sparsek's compiled eager fast path.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__sparsek_eager(void) { return PyModule_Create(&kModule); }
