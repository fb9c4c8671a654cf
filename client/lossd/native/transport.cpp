// The lossd client's native transport: a unary call over a gRPC C++ channel, with the GIL
// released for all of it. grpcio's Python call path costs a small call more CPU than the
// server spends on it; this one costs a fraction (see lossd._transport).
//
// Channel(target, options) opens a channel configured as grpcio's would be with the same
// options (message limits, service config with retries and load balancing, keepalive).
// Channel.call(method, request, timeout, metadata) -> (code, details, trailing, response):
// the status in gRPC's numbering, the trailing metadata as grpcio gives it (bytes for
// -bin keys, str otherwise) and the response bytes (None unless OK). timeout < 0: none.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpc/grpc.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

// One completion queue per calling thread, shut down and drained when the thread ends.
struct ThreadQueue {
  grpc::CompletionQueue cq;
  ~ThreadQueue() {
    cq.Shutdown();
    void* tag;
    bool ok;
    while (cq.Next(&tag, &ok)) {
    }
  }
};

constexpr std::chrono::milliseconds kSignalCheck(100);

grpc::CompletionQueue& thread_queue() {
  static thread_local ThreadQueue queue;
  return queue.cq;
}

struct ChannelObject {
  PyObject_HEAD
  std::shared_ptr<grpc::Channel>* channel;  // empty once closed; a call holds its own copy
};

bool set_option(grpc::ChannelArguments& args, PyObject* item) {
  const char* key;
  PyObject* value;
  if (!PyArg_ParseTuple(item, "sO", &key, &value)) return false;
  if (PyLong_Check(value)) {
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) return false;
    args.SetInt(key, static_cast<int>(v));
  } else if (PyUnicode_Check(value)) {
    const char* v = PyUnicode_AsUTF8(value);
    if (v == nullptr) return false;
    args.SetString(key, v);
  } else {
    PyErr_Format(PyExc_TypeError, "channel option %s: an int or a str", key);
    return false;
  }
  return true;
}

PyObject* channel_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  const char* target;
  PyObject* options;
  if (!PyArg_ParseTuple(args, "sO", &target, &options)) return nullptr;
  grpc::ChannelArguments channel_args;
  PyObject* seq = PySequence_Fast(options, "options must be a sequence");
  if (seq == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    if (!set_option(channel_args, PySequence_Fast_GET_ITEM(seq, i))) {
      Py_DECREF(seq);
      return nullptr;
    }
  }
  Py_DECREF(seq);
  auto* self = reinterpret_cast<ChannelObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  std::shared_ptr<grpc::Channel> channel;
  Py_BEGIN_ALLOW_THREADS
  channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), channel_args);
  Py_END_ALLOW_THREADS
  self->channel = new std::shared_ptr<grpc::Channel>(std::move(channel));
  return reinterpret_cast<PyObject*>(self);
}

// Drop the channel (without the GIL: the last reference's destructor may wait on gRPC).
void release(ChannelObject* self, bool forget) {
  if (self->channel == nullptr) return;
  std::shared_ptr<grpc::Channel> last = std::move(*self->channel);
  if (forget) {
    delete self->channel;
    self->channel = nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  last.reset();
  Py_END_ALLOW_THREADS
}

void channel_dealloc(ChannelObject* self) {
  release(self, true);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* to_str_or_bytes(const grpc::string_ref& key, const grpc::string_ref& value) {
  bool binary = key.size() >= 4 && std::memcmp(key.data() + key.size() - 4, "-bin", 4) == 0;
  if (binary) return PyBytes_FromStringAndSize(value.data(), static_cast<Py_ssize_t>(value.size()));
  return PyUnicode_DecodeLatin1(value.data(), static_cast<Py_ssize_t>(value.size()), nullptr);
}

PyObject* channel_call(ChannelObject* self, PyObject* args) {
  const char* method;
  Py_buffer request;
  double timeout;
  PyObject* metadata;
  if (!PyArg_ParseTuple(args, "sy*dO", &method, &request, &timeout, &metadata)) return nullptr;
  std::shared_ptr<grpc::Channel> channel = *self->channel;
  if (!channel) {
    PyBuffer_Release(&request);
    PyErr_SetString(PyExc_ValueError, "the channel is closed");
    return nullptr;
  }
  std::vector<std::pair<std::string, std::string>> md;
  PyObject* seq = PySequence_Fast(metadata, "metadata must be a sequence");
  if (seq == nullptr) {
    PyBuffer_Release(&request);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char *key, *value;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ss", &key, &value)) {
      Py_DECREF(seq);
      PyBuffer_Release(&request);
      return nullptr;
    }
    md.emplace_back(key, value);
  }
  Py_DECREF(seq);
  grpc::Slice slice(request.buf, static_cast<size_t>(request.len));
  PyBuffer_Release(&request);
  grpc::ByteBuffer send(&slice, 1), received;
  grpc::Status status;
  grpc::ClientContext context;
  std::vector<std::pair<std::string, std::string>> trailing;
  bool interrupted = false;
  Py_BEGIN_ALLOW_THREADS
  for (auto& kv : md) context.AddMetadata(kv.first, kv.second);
  if (timeout >= 0)
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::duration_cast<std::chrono::system_clock::duration>(
                             std::chrono::duration<double>(timeout)));
  grpc::CompletionQueue& cq = thread_queue();
  grpc::GenericStub stub(channel);
  auto call = stub.PrepareUnaryCall(&context, method, send, &cq);
  call->StartCall();
  call->Finish(&received, &status, &context);
  void* tag;
  bool ok;
  // The only operation on this queue now is Finish's. Waited for in slices, so that a
  // signal (Ctrl-C) cancels the call, as it interrupts a grpcio call.
  while (cq.AsyncNext(&tag, &ok, std::chrono::system_clock::now() + kSignalCheck) ==
         grpc::CompletionQueue::TIMEOUT) {
    Py_BLOCK_THREADS
    interrupted = PyErr_CheckSignals() != 0;
    Py_UNBLOCK_THREADS
    if (interrupted) {
      context.TryCancel();
      cq.Next(&tag, &ok);
      break;
    }
  }
  call.reset();
  channel.reset();
  for (auto& kv : context.GetServerTrailingMetadata())
    trailing.emplace_back(std::string(kv.first.data(), kv.first.size()),
                          std::string(kv.second.data(), kv.second.size()));
  Py_END_ALLOW_THREADS
  if (interrupted) return nullptr;  // the signal handler's exception
  PyObject* trailers = PyTuple_New(static_cast<Py_ssize_t>(trailing.size()));
  if (trailers == nullptr) return nullptr;
  for (size_t i = 0; i < trailing.size(); ++i) {
    PyObject* value = to_str_or_bytes(trailing[i].first, trailing[i].second);
    if (value == nullptr) {
      Py_DECREF(trailers);
      return nullptr;
    }
    PyTuple_SET_ITEM(trailers, static_cast<Py_ssize_t>(i),
                     Py_BuildValue("(s#N)", trailing[i].first.data(),
                                   static_cast<Py_ssize_t>(trailing[i].first.size()), value));
  }
  PyObject* response = Py_None;
  if (status.ok()) {
    std::vector<grpc::Slice> slices;
    if (!received.Dump(&slices).ok()) {
      Py_DECREF(trailers);
      PyErr_SetString(PyExc_RuntimeError, "cannot read the response");
      return nullptr;
    }
    size_t size = 0;
    for (auto& s : slices) size += s.size();
    response = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
    if (response == nullptr) {
      Py_DECREF(trailers);
      return nullptr;
    }
    char* at = PyBytes_AS_STRING(response);
    for (auto& s : slices) {
      std::memcpy(at, s.begin(), s.size());
      at += s.size();
    }
  } else {
    Py_INCREF(response);
  }
  const std::string& details = status.error_message();
  return Py_BuildValue("(is#NN)", static_cast<int>(status.error_code()), details.data(),
                       static_cast<Py_ssize_t>(details.size()), trailers, response);
}

PyObject* channel_close(ChannelObject* self, PyObject*) {
  release(self, false);
  Py_RETURN_NONE;
}

PyMethodDef channel_methods[] = {
    {"call", reinterpret_cast<PyCFunction>(channel_call), METH_VARARGS,
     "call(method, request, timeout, metadata) -> (code, details, trailing, response)"},
    {"close", reinterpret_cast<PyCFunction>(channel_close), METH_NOARGS,
     "close(): no more calls (calls in flight end first)"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject ChannelType = {PyVarObject_HEAD_INIT(nullptr, 0) "lossd._native_transport.Channel"};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_native_transport",
                          "lossd's native client transport (see lossd._transport).", -1,
                          nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native_transport() {
  // gRPC C++ stays initialised for the life of the process. Otherwise the last channel or
  // completion queue to go (at exit, say) starts gRPC's shutdown on a detached thread, which
  // races the process's own exit.
  grpc_init();
  ChannelType.tp_basicsize = sizeof(ChannelObject);
  ChannelType.tp_flags = Py_TPFLAGS_DEFAULT;
  ChannelType.tp_doc = "A gRPC C++ channel making unary calls with the GIL released.";
  ChannelType.tp_new = channel_new;
  ChannelType.tp_dealloc = reinterpret_cast<destructor>(channel_dealloc);
  ChannelType.tp_methods = channel_methods;
  if (PyType_Ready(&ChannelType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  Py_INCREF(&ChannelType);
  if (PyModule_AddObject(module, "Channel", reinterpret_cast<PyObject*>(&ChannelType)) < 0) {
    Py_DECREF(&ChannelType);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
