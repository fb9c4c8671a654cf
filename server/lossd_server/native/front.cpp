// lossd's native gRPC front: gRPC C++'s callback server carries every call, and Python
// runs it (lossd_server.native). The C++ side knows nothing of lossd: it receives a call,
// reads its first message, and queues the call; a Python thread takes it with next_call(),
// runs the method's handler, and answers through the call's read/write/finish.
//
// Why: grpcio's Python server moves every call between its polling thread and a pool
// thread, each move a GIL hand-off. Here one Python thread can take call after call without
// giving the GIL up, and no Python runs while a call waits for its message.
//
// Threads: gRPC's callbacks (OnReadDone, OnWriteDone, OnCancel, OnDone) never take the GIL,
// except OnDone for a call with Python done-callbacks (and report() for a call the bounds on
// unsent calls end). Python's blocking calls (next_call, read, write, shutdown) release it
// while they wait. Two threads of our own: the reaper (the bounds on calls whose message
// has not arrived) and the finisher, which sends the answers Python hands over in
// Call.finish, so that gRPC's work to send one runs beside the next call's Python.
// With yield_io (Linux), the threads the server starts, gRPC's and ours, are SCHED_BATCH:
// they never preempt the thread running the handlers, which keeps its caches and the GIL.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <sched.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

class Reactor;

// What a call's reactor and its Python object share; outlives whichever ends first.
struct CallState {
  // op_mu orders Python's operations (StartRead, StartWrite, Finish) against each other and
  // is never taken in a gRPC callback; mu guards the flags and is never held while an
  // operation starts (gRPC may run a callback inline).
  std::mutex op_mu;
  std::mutex mu;
  std::condition_variable cv;
  Reactor* reactor = nullptr;  // null once gRPC is done with the call (OnDone)
  bool finished = false;       // Finish started: no more reads or writes
  bool cancelled = false;
  bool reading = false, read_done = false, read_ok = false;
  bool writing = false, write_done = false, write_ok = false;
  grpc::ByteBuffer read_buf, write_buf, last_buf;
  std::vector<PyObject*> on_done;  // Python callables, called once when the call ends
  // While the first message has not arrived (guarded by the queue's mu):
  bool unsent = false;
  std::list<std::shared_ptr<CallState>>::iterator unsent_at;
  std::chrono::steady_clock::time_point since;
  std::string host, method;
};

using Clock = std::chrono::steady_clock;
using Trailers = std::vector<std::pair<std::string, std::string>>;
bool finish(CallState& s, const grpc::Status& status, const Trailers& trailing,
            const Py_buffer* response);

struct Queue {
  std::mutex mu;
  // Each waiter on mu has a condition of its own, so that a queued call wakes only the
  // thread that takes it: cv the dispatcher (min_age 0); aged_cv a spill thread (min_age
  // > 0), woken by a call only when it sleeps on an empty queue (aged_idle) and else by
  // its own timer, when the oldest call comes of age; reap_cv the reaper (its timer).
  std::condition_variable cv, aged_cv, reap_cv;
  bool aged_idle = false;
  // When the dispatcher last took a call: a spill thread takes one only while the
  // dispatcher has taken none for min_age (it is held up), not merely because calls queue
  // behind a busy one (spilling those adds no capacity, only GIL hand-offs).
  Clock::time_point last_take{};
  std::deque<std::pair<std::shared_ptr<CallState>, Clock::time_point>> calls;  // FIFO
  bool closed = false;
  // Every call gRPC has not finished with (for a shutdown whose grace runs out); guarded by
  // live_mu, never held while a call's own locks are taken.
  std::mutex live_mu;
  std::condition_variable live_cv;
  std::unordered_map<CallState*, std::weak_ptr<CallState>> live;
  // Calls whose first message has not arrived, oldest first (guarded by mu): at most
  // max_unsent, each for at most unsent_timeout (the --max-receiving and
  // --message-timeout-seconds bounds grpcio's front enforces in Python).
  std::list<std::shared_ptr<CallState>> unsent;
  size_t max_unsent = 32;
  double unsent_timeout = 30.0;
  size_t reported = 0;
  PyObject* on_event = nullptr;  // on_event(method, reason or None, unsent calls)
  // Request-streaming methods: handed to Python at once, their messages all read there
  // (a stream's waits are Python's, as on grpcio). Set before the server starts.
  std::unordered_set<std::string> streaming;
  // Tokens required: a call without an authorization header is handed to Python at once,
  // whose gate refuses it before any message (no message is read for it here).
  bool auth_required = false;
  // Finishes Python asked for, carried out by the finisher thread: gRPC's work to send an
  // answer runs beside the next call's Python instead of under the GIL.
  std::mutex fin_mu;
  std::condition_variable fin_cv;
  std::deque<std::function<void()>> finishing;
  bool fin_stop = false;
};

// Tell Python (with the GIL) that a call waiting for its message was ended, or how many
// wait now (reason null).
void report(Queue& q, const std::string& method, const char* reason, size_t waiting) {
  if (q.on_event == nullptr || !Py_IsInitialized()) return;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject* r = PyObject_CallFunction(q.on_event, "s#zn", method.data(),
                                      static_cast<Py_ssize_t>(method.size()), reason,
                                      static_cast<Py_ssize_t>(waiting));
  if (r == nullptr) PyErr_WriteUnraisable(q.on_event);
  Py_XDECREF(r);
  PyGILState_Release(g);
}

void take_unsent(Queue& q, CallState& s) {  // under q.mu
  if (s.unsent) {
    q.unsent.erase(s.unsent_at);
    s.unsent = false;
  }
}

// The longest wait of the host holding most waits (under q.mu; q.unsent not empty).
std::shared_ptr<CallState> victim(Queue& q) {
  std::unordered_map<std::string, size_t> counts;
  size_t most = 0;
  for (auto& st : q.unsent) most = std::max(most, ++counts[st->host]);
  for (auto& st : q.unsent)
    if (counts[st->host] == most) return st;
  return q.unsent.front();
}

PyObject* bytes_of(grpc::ByteBuffer& buf) {
  std::vector<grpc::Slice> slices;
  if (!buf.Dump(&slices).ok()) return PyBytes_FromStringAndSize(nullptr, 0);
  size_t n = 0;
  for (auto& s : slices) n += s.size();
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
  if (out == nullptr) return nullptr;
  char* p = PyBytes_AS_STRING(out);
  for (auto& s : slices) {
    std::memcpy(p, s.begin(), s.size());
    p += s.size();
  }
  return out;
}

// Queue a call for Python (mu held); true when a spill thread sleeps on the empty queue
// and must be woken to time the call (see Queue::aged_cv).
bool push(Queue& q, std::shared_ptr<CallState> state) {
  q.calls.emplace_back(std::move(state), Clock::now());
  bool spill = q.aged_idle;
  q.aged_idle = false;
  return spill;
}

// After push (mu released): the dispatcher, and the spill thread if push said so.
void wake(Queue& q, bool spill) {
  q.cv.notify_all();
  if (spill) q.aged_cv.notify_all();
}

// Close the queue: every thread waiting on it returns.
void close(Queue& q) {
  {
    std::lock_guard<std::mutex> l(q.mu);
    q.closed = true;
  }
  q.cv.notify_all();
  q.aged_cv.notify_all();
  q.reap_cv.notify_all();
}

class Reactor : public grpc::ServerGenericBidiReactor {
 public:
  Reactor(grpc::GenericCallbackServerContext* ctx, std::shared_ptr<Queue> queue)
      : ctx_(ctx), queue_(std::move(queue)), state_(std::make_shared<CallState>()) {
    state_->reactor = this;
    {
      std::lock_guard<std::mutex> l(queue_->live_mu);
      queue_->live.emplace(state_.get(), state_);
    }
    std::string peer = ctx->peer();
    state_->host = peer.substr(0, peer.rfind(':'));
    state_->method = ctx->method();
    if (queue_->streaming.count(state_->method) != 0 ||
        (queue_->auth_required &&
         ctx->client_metadata().find("authorization") == ctx->client_metadata().end())) {
      // (Operations Python starts before gRPC binds the reactor wait in its backlog.)
      queued_ = streaming_ = true;
      bool closed, spill = false;
      {
        std::lock_guard<std::mutex> l(queue_->mu);
        closed = queue_->closed;
        if (!closed) spill = push(*queue_, state_);
      }
      if (closed) {
        finish(*state_, grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"),
               {}, nullptr);
      } else {
        wake(*queue_, spill);
      }
      return;
    }
    std::shared_ptr<CallState> evicted;
    double waited = 0;
    {
      std::lock_guard<std::mutex> l(queue_->mu);
      auto now = Clock::now();
      if (queue_->unsent.size() >= queue_->max_unsent && !queue_->unsent.empty()) {
        evicted = victim(*queue_);
        take_unsent(*queue_, *evicted);
        waited = std::chrono::duration<double>(now - evicted->since).count();
      }
      state_->since = now;
      state_->unsent = true;
      state_->unsent_at = queue_->unsent.insert(queue_->unsent.end(), state_);
    }
    StartRead(&first_);
    if (evicted) {
      char message[200];
      std::snprintf(message, sizeof message,
                    "request message not received after %.1f s while %zu calls waited for "
                    "theirs (--max-receiving); this call waited longest", waited,
                    queue_->max_unsent);
      if (finish(*evicted, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, message), {}, nullptr))
        report(*queue_, evicted->method, "evicted", 0);
    }
  }

  grpc::GenericCallbackServerContext* context() { return ctx_; }
  grpc::ByteBuffer& first() { return first_; }
  bool has_first() const { return has_first_; }
  bool streaming() const { return streaming_; }

  void OnReadDone(bool ok) override {
    if (!queued_) {  // the first message (or its absence): the call goes to Python now
      queued_ = true;
      has_first_ = ok;
      bool closed, ended, spill = false;
      {
        std::lock_guard<std::mutex> l(state_->mu);
        ended = state_->finished;  // evicted, timed out or drained while it waited
      }
      {
        std::lock_guard<std::mutex> l(queue_->mu);
        take_unsent(*queue_, *state_);
        closed = queue_->closed;
        if (!closed && !ended) spill = push(*queue_, state_);
      }
      if (ended) return;
      if (closed) {
        finish(*state_, grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"),
               {}, nullptr);
        return;
      }
      wake(*queue_, spill);
      return;
    }
    std::lock_guard<std::mutex> l(state_->mu);
    state_->reading = false;
    state_->read_done = true;
    state_->read_ok = ok;
    state_->cv.notify_all();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(state_->mu);
    state_->writing = false;
    state_->write_done = true;
    state_->write_ok = ok;
    state_->cv.notify_all();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> l(state_->mu);
    state_->cancelled = true;
    state_->cv.notify_all();
  }

  void OnDone() override {
    std::vector<PyObject*> callbacks;
    {
      std::lock_guard<std::mutex> l(state_->mu);
      state_->reactor = nullptr;
      state_->finished = true;
      state_->reading = state_->writing = false;
      state_->read_done = state_->write_done = true;
      callbacks.swap(state_->on_done);
      state_->cv.notify_all();
    }
    {
      std::lock_guard<std::mutex> l(queue_->live_mu);
      queue_->live.erase(state_.get());
      if (queue_->live.empty()) queue_->live_cv.notify_all();
    }
    if (!callbacks.empty() && Py_IsInitialized()) {
      PyGILState_STATE g = PyGILState_Ensure();
      for (PyObject* fn : callbacks) {
        PyObject* r = PyObject_CallNoArgs(fn);
        if (r == nullptr) PyErr_WriteUnraisable(fn);
        Py_XDECREF(r);
        Py_DECREF(fn);
      }
      PyGILState_Release(g);
    }
    delete this;
  }

 private:
  grpc::GenericCallbackServerContext* ctx_;
  std::shared_ptr<Queue> queue_;
  std::shared_ptr<CallState> state_;
  grpc::ByteBuffer first_;
  bool queued_ = false, has_first_ = false, streaming_ = false;
};

class Service : public grpc::CallbackGenericService {
 public:
  explicit Service(std::shared_ptr<Queue> queue) : queue_(std::move(queue)) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Reactor(ctx, queue_);
  }

 private:
  std::shared_ptr<Queue> queue_;
};

// ---- Python type: Call ----------------------------------------------------------------

struct CallObject {
  PyObject_HEAD
  std::shared_ptr<CallState>* state;
  std::shared_ptr<Queue>* queue;  // the server's: its finisher ends the call
  PyObject* method;
  PyObject* peer;
  PyObject* metadata;
  PyObject* request;  // the first message (bytes) or None
  double deadline;    // seconds since the epoch; +inf without one
  bool streaming;     // a request-streaming method: no message read yet
};

void call_dealloc(CallObject* self) {
  delete self->state;
  delete self->queue;
  Py_XDECREF(self->method);
  Py_XDECREF(self->peer);
  Py_XDECREF(self->metadata);
  Py_XDECREF(self->request);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

// Start an operation on the call unless it has ended; false if it had.
template <typename F>
bool start(CallState& s, bool CallState::*busy, bool CallState::*done, F op) {
  std::lock_guard<std::mutex> ops(s.op_mu);
  {
    std::lock_guard<std::mutex> l(s.mu);
    if (s.reactor == nullptr || s.finished || s.cancelled || s.*busy) return false;
    s.*busy = true;
    s.*done = false;
  }
  op(s.reactor);
  return true;
}

PyObject* call_read(CallObject* self, PyObject*) {
  CallState& s = **self->state;
  bool ok = false;
  Py_BEGIN_ALLOW_THREADS
  if (start(s, &CallState::reading, &CallState::read_done,
            [&s](Reactor* r) { r->StartRead(&s.read_buf); })) {
    std::unique_lock<std::mutex> l(s.mu);
    s.cv.wait(l, [&s] { return s.read_done; });
    ok = s.read_ok;
  }
  Py_END_ALLOW_THREADS
  if (!ok) Py_RETURN_NONE;
  PyObject* out = bytes_of(s.read_buf);
  s.read_buf.Clear();  // an idle stream pins none of its last message
  return out;
}

PyObject* call_write(CallObject* self, PyObject* arg) {
  Py_buffer view;
  if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0) return nullptr;
  CallState& s = **self->state;
  bool ok = false;
  Py_BEGIN_ALLOW_THREADS
  grpc::Slice slice(view.buf, static_cast<size_t>(view.len));
  if (start(s, &CallState::writing, &CallState::write_done, [&s, &slice](Reactor* r) {
        s.write_buf = grpc::ByteBuffer(&slice, 1);
        r->StartWrite(&s.write_buf);
      })) {
    std::unique_lock<std::mutex> l(s.mu);
    s.cv.wait(l, [&s] { return s.write_done; });
    ok = s.write_ok;
    s.write_buf.Clear();
  }
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&view);
  return PyBool_FromLong(ok);
}

// Claim the end of the call: no operation starts after it. False if it had ended; *write:
// whether a response goes with the status.
bool claim(CallState& s, const grpc::Status& status, bool with_response, bool* write) {
  std::lock_guard<std::mutex> l(s.mu);
  if (s.reactor == nullptr || s.finished) return false;
  s.finished = true;
  *write = with_response && status.ok() && !s.writing;
  return true;
}

// End a claimed call: its trailers, then the status (with the response when write).
void perform(CallState& s, const grpc::Status& status, const Trailers& trailing, bool write,
             const grpc::Slice& response) {
  std::lock_guard<std::mutex> ops(s.op_mu);
  Reactor* r = s.reactor;  // alive until Finish completes (OnDone)
  for (const auto& kv : trailing) r->context()->AddTrailingMetadata(kv.first, kv.second);
  if (write) {
    s.last_buf = grpc::ByteBuffer(&response, 1);
    r->StartWriteAndFinish(&s.last_buf, grpc::WriteOptions(), status);
  } else {
    r->Finish(status);
  }
}

// End the call with status (and response, written with it) unless it has ended already.
bool finish(CallState& s, const grpc::Status& status, const Trailers& trailing,
            const Py_buffer* response) {
  bool write;
  if (!claim(s, status, response != nullptr, &write)) return false;
  perform(s, status, trailing, write,
          write ? grpc::Slice(response->buf, static_cast<size_t>(response->len)) : grpc::Slice());
  return true;
}

void finisher(std::shared_ptr<Queue> queue) {
  Queue& q = *queue;
  std::unique_lock<std::mutex> l(q.fin_mu);
  while (true) {
    q.fin_cv.wait(l, [&q] { return q.fin_stop || !q.finishing.empty(); });
    if (q.finishing.empty()) return;  // stopping, and nothing left
    auto work = std::move(q.finishing.front());
    q.finishing.pop_front();
    l.unlock();
    work();
    l.lock();
  }
}

// finish(code, details, trailing_metadata, response=None): end the call; with a response,
// it is written with the status (one operation). False when the call had ended already.
PyObject* call_finish(CallObject* self, PyObject* args) {
  int code;
  const char* details;
  Py_ssize_t details_len;
  PyObject* trailing;
  PyObject* response = Py_None;
  if (!PyArg_ParseTuple(args, "is#O|O", &code, &details, &details_len, &trailing, &response))
    return nullptr;
  std::vector<std::pair<std::string, std::string>> md;
  PyObject* seq = PySequence_Fast(trailing, "trailing metadata must be a sequence");
  if (seq == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    PyObject *key, *value;
    if (!PyArg_ParseTuple(item, "OO", &key, &value)) {
      Py_DECREF(seq);
      return nullptr;
    }
    Py_ssize_t kn, vn;
    const char* k = PyUnicode_AsUTF8AndSize(key, &kn);
    if (k == nullptr) {
      Py_DECREF(seq);
      return nullptr;
    }
    const char* v;
    if (PyBytes_Check(value)) {
      v = PyBytes_AS_STRING(value);
      vn = PyBytes_GET_SIZE(value);
    } else {
      v = PyUnicode_AsUTF8AndSize(value, &vn);
      if (v == nullptr) {
        Py_DECREF(seq);
        return nullptr;
      }
    }
    md.emplace_back(std::string(k, kn), std::string(v, vn));
  }
  Py_DECREF(seq);
  Py_buffer view;
  bool has_response = response != Py_None;
  if (has_response && PyObject_GetBuffer(response, &view, PyBUF_SIMPLE) != 0) return nullptr;
  grpc::Status status(static_cast<grpc::StatusCode>(code), std::string(details, details_len));
  bool write = false;
  bool done = claim(**self->state, status, has_response, &write);
  if (done) {
    grpc::Slice slice = write ? grpc::Slice(view.buf, static_cast<size_t>(view.len)) : grpc::Slice();
    Queue& q = **self->queue;
    // Sent by the finisher thread: even with no call waiting, handing it over measured
    // faster than sending from here (the answer goes out while this thread returns).
    {
      std::lock_guard<std::mutex> l(q.fin_mu);
      q.finishing.emplace_back(
          [state = *self->state, status, md = std::move(md), write, slice = std::move(slice)] {
            perform(*state, status, md, write, slice);
          });
    }
    q.fin_cv.notify_one();
  }
  if (has_response) PyBuffer_Release(&view);
  return PyBool_FromLong(done);
}

PyObject* call_is_active(CallObject* self, PyObject*) {
  CallState& s = **self->state;
  std::lock_guard<std::mutex> l(s.mu);
  return PyBool_FromLong(s.reactor != nullptr && !s.finished && !s.cancelled);
}

// add_done_callback(fn): fn() runs (on a gRPC thread, with the GIL) when the call ends;
// at once if it has ended. The caller's exceptions are reported as unraisable.
PyObject* call_add_done_callback(CallObject* self, PyObject* fn) {
  CallState& s = **self->state;
  bool now = false;
  {
    std::lock_guard<std::mutex> l(s.mu);
    if (s.reactor == nullptr) {
      now = true;
    } else {
      Py_INCREF(fn);
      s.on_done.push_back(fn);
    }
  }
  if (now) {
    PyObject* r = PyObject_CallNoArgs(fn);
    if (r == nullptr) return nullptr;
    Py_DECREF(r);
  }
  Py_RETURN_NONE;
}

// take_request() -> the first message (bytes) or None; the call keeps no reference to it.
PyObject* call_take_request(CallObject* self, PyObject*) {
  PyObject* out = self->request;
  Py_INCREF(Py_None);
  self->request = Py_None;
  return out;
}

PyMethodDef call_methods[] = {
    {"take_request", reinterpret_cast<PyCFunction>(call_take_request), METH_NOARGS,
     "The first request message (bytes) or None, handed over: the call keeps no reference."},
    {"read", reinterpret_cast<PyCFunction>(call_read), METH_NOARGS,
     "The next request message (bytes), or None when the caller closed or the call ended."},
    {"write", reinterpret_cast<PyCFunction>(call_write), METH_O,
     "Send one response message; False when the call has ended."},
    {"finish", reinterpret_cast<PyCFunction>(call_finish), METH_VARARGS,
     "finish(code, details, trailing_metadata, response=None): end the call."},
    {"is_active", reinterpret_cast<PyCFunction>(call_is_active), METH_NOARGS,
     "True until the call ends or the caller cancels it."},
    {"add_done_callback", reinterpret_cast<PyCFunction>(call_add_done_callback), METH_O,
     "Call fn() once the call has ended."},
    {nullptr, nullptr, 0, nullptr}};

PyObject* call_get(CallObject* self, void* which) {
  PyObject* v = nullptr;
  switch (reinterpret_cast<intptr_t>(which)) {
    case 0: v = self->method; break;
    case 1: v = self->peer; break;
    case 2: v = self->metadata; break;
    case 5: return PyBool_FromLong(self->streaming);
    case 3:
      return PyLong_FromSsize_t(self->request == Py_None ? -1 : PyBytes_GET_SIZE(self->request));
    default: return PyFloat_FromDouble(self->deadline);
  }
  Py_INCREF(v);
  return v;
}

PyGetSetDef call_getset[] = {
    {"method", reinterpret_cast<getter>(call_get), nullptr, "/package.Service/Method", reinterpret_cast<void*>(0)},
    {"peer", reinterpret_cast<getter>(call_get), nullptr, "the caller's address", reinterpret_cast<void*>(1)},
    {"metadata", reinterpret_cast<getter>(call_get), nullptr, "((key, value), ...)", reinterpret_cast<void*>(2)},
    {"request_size", reinterpret_cast<getter>(call_get), nullptr, "bytes of the first message; -1: none", reinterpret_cast<void*>(3)},
    {"deadline", reinterpret_cast<getter>(call_get), nullptr, "time.time() seconds; inf: none", reinterpret_cast<void*>(4)},
    {"streaming", reinterpret_cast<getter>(call_get), nullptr, "request-streaming: read every message", reinterpret_cast<void*>(5)},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject CallType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* make_call(std::shared_ptr<CallState> state, const std::shared_ptr<Queue>& queue) {
  Reactor* r = state->reactor;  // alive: the call finishes only once Python ends it
  auto* ctx = r->context();
  CallObject* self = PyObject_New(CallObject, &CallType);
  if (self == nullptr) return nullptr;
  self->state = new std::shared_ptr<CallState>(state);
  self->queue = new std::shared_ptr<Queue>(queue);
  self->method = PyUnicode_FromStringAndSize(ctx->method().data(), static_cast<Py_ssize_t>(ctx->method().size()));
  std::string peer = ctx->peer();
  self->peer = PyUnicode_FromStringAndSize(peer.data(), static_cast<Py_ssize_t>(peer.size()));
  const auto& md = ctx->client_metadata();
  self->metadata = PyTuple_New(static_cast<Py_ssize_t>(md.size()));
  Py_ssize_t i = 0;
  for (const auto& kv : md) {
    PyObject* key = PyUnicode_FromStringAndSize(kv.first.data(), static_cast<Py_ssize_t>(kv.first.size()));
    bool binary = kv.first.size() > 4 && std::memcmp(kv.first.data() + kv.first.size() - 4, "-bin", 4) == 0;
    PyObject* value = binary ? PyBytes_FromStringAndSize(kv.second.data(), static_cast<Py_ssize_t>(kv.second.size()))
                             : PyUnicode_DecodeLatin1(kv.second.data(), static_cast<Py_ssize_t>(kv.second.size()), "replace");
    PyTuple_SET_ITEM(self->metadata, i++, PyTuple_Pack(2, key, value));
    Py_DECREF(key);
    Py_DECREF(value);
  }
  if (r->has_first()) {
    self->request = bytes_of(r->first());
    r->first().Clear();
  } else {
    Py_INCREF(Py_None);
    self->request = Py_None;
  }
  self->streaming = r->streaming();
  auto deadline = ctx->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    self->deadline = Py_HUGE_VAL;
  } else {
    self->deadline = std::chrono::duration<double>(deadline.time_since_epoch()).count();
  }
  return reinterpret_cast<PyObject*>(self);
}

// ---- Python type: Server --------------------------------------------------------------

// While alive (when asked, on Linux): the calling thread at SCHED_BATCH, so that the threads
// it starts inherit the policy; its own policy is restored after. applied: whether it took.
class BatchPolicyScope {
 public:
  explicit BatchPolicyScope(bool wanted) {
#ifdef SCHED_BATCH
    if (!wanted) return;
    old_policy_ = sched_getscheduler(0);
    if (old_policy_ < 0 || sched_getparam(0, &old_param_) != 0) return;
    sched_param batch{};
    applied = sched_setscheduler(0, SCHED_BATCH, &batch) == 0;
#else
    (void)wanted;
#endif
  }
  ~BatchPolicyScope() {
#ifdef SCHED_BATCH
    if (applied) sched_setscheduler(0, old_policy_, &old_param_);
#endif
  }
  BatchPolicyScope(const BatchPolicyScope&) = delete;
  BatchPolicyScope& operator=(const BatchPolicyScope&) = delete;
  bool applied = false;

 private:
  int old_policy_ = 0;
  sched_param old_param_{};
};

struct ServerObject {
  PyObject_HEAD
  grpc::ServerBuilder* builder;
  grpc::Server* server;
  Service* service;
  std::shared_ptr<Queue>* queue;
  std::vector<int*>* ports;
  std::thread* reaper;
  std::thread* finisher;
  bool yield_io;     // start the server's threads SCHED_BATCH (see BatchPolicyScope)
  bool io_yielding;  // they were
};

// Every 100 ms: end the calls whose first message is overdue, and report how many wait.
void reap(std::shared_ptr<Queue> queue) {
  Queue& q = *queue;
  auto timeout = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(q.unsent_timeout));
  std::unique_lock<std::mutex> l(q.mu);
  while (!q.closed) {
    q.reap_cv.wait_for(l, std::chrono::milliseconds(100));
    std::vector<std::shared_ptr<CallState>> expired;
    auto cutoff = Clock::now() - timeout;
    while (!q.unsent.empty() && q.unsent.front()->since <= cutoff) {
      expired.push_back(q.unsent.front());
      take_unsent(q, *expired.back());
    }
    size_t waiting = q.unsent.size();
    bool changed = waiting != q.reported;
    q.reported = waiting;
    l.unlock();
    char message[120];
    std::snprintf(message, sizeof message,
                  "request message not received within %g s (--message-timeout-seconds)",
                  q.unsent_timeout);
    for (auto& st : expired)
      if (finish(*st, grpc::Status(grpc::StatusCode::UNAVAILABLE, message), {}, nullptr))
        report(q, st->method, "message_timeout", waiting);
    if (changed) report(q, "", nullptr, waiting);
    l.lock();
  }
}

// Set *flag under mu, wake the thread and join it (without the GIL); none is fine.
void stop_thread(std::thread*& thread, std::mutex& mu, std::condition_variable& cv,
                 bool& flag) {
  if (thread == nullptr) return;
  {
    std::lock_guard<std::mutex> l(mu);
    flag = true;
  }
  cv.notify_all();
  Py_BEGIN_ALLOW_THREADS
  thread->join();
  Py_END_ALLOW_THREADS
  delete thread;
  thread = nullptr;
}

// The finisher stops once it has carried out every finish asked of it.
void stop_finisher(ServerObject* self) {
  Queue& q = **self->queue;
  stop_thread(self->finisher, q.fin_mu, q.fin_cv, q.fin_stop);
}

// The reaper stops with the queue closed (no call is queued for Python after it).
void stop_reaper(ServerObject* self) {
  if (self->reaper == nullptr) return;
  close(**self->queue);
  Py_BEGIN_ALLOW_THREADS
  self->reaper->join();
  Py_END_ALLOW_THREADS
  delete self->reaper;
  self->reaper = nullptr;
}

void server_dealloc(ServerObject* self) {
  stop_reaper(self);
  stop_finisher(self);
  if (self->queue != nullptr) Py_CLEAR((*self->queue)->on_event);
  if (self->server != nullptr) {
    Py_BEGIN_ALLOW_THREADS
    self->server->Shutdown(std::chrono::system_clock::now());
    self->server->Wait();
    Py_END_ALLOW_THREADS
    delete self->server;
  }
  delete self->builder;
  delete self->service;
  delete self->queue;
  if (self->ports != nullptr) {
    for (int* p : *self->ports) delete p;
    delete self->ports;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

// Server(options, max_unsent, unsent_timeout, on_event, yield_io=False): options as grpcio
// takes them, [(name, int or str), ...]; the bounds on calls whose first message has not
// arrived; on_event(method, reason or None, waiting), told of each call those bounds end;
// yield_io: the threads start() starts run SCHED_BATCH (see BatchPolicyScope).
int server_init(ServerObject* self, PyObject* args, PyObject*) {
  PyObject* options;
  PyObject* on_event;
  Py_ssize_t max_unsent;
  double unsent_timeout;
  int yield_io = 0;
  if (!PyArg_ParseTuple(args, "OndO|p", &options, &max_unsent, &unsent_timeout, &on_event,
                        &yield_io))
    return -1;
  self->yield_io = yield_io != 0;
  self->io_yielding = false;
  self->reaper = nullptr;
  self->finisher = nullptr;
  self->queue = new std::shared_ptr<Queue>(std::make_shared<Queue>());
  (*self->queue)->max_unsent = static_cast<size_t>(std::max<Py_ssize_t>(1, max_unsent));
  (*self->queue)->unsent_timeout = unsent_timeout;
  if (on_event != Py_None) {
    Py_INCREF(on_event);
    (*self->queue)->on_event = on_event;
  }
  self->service = new Service(*self->queue);
  self->builder = new grpc::ServerBuilder();
  self->ports = new std::vector<int*>();
  self->server = nullptr;
  PyObject* seq = PySequence_Fast(options, "options must be a sequence of (name, value)");
  if (seq == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char* name;
    PyObject* value;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "sO", &name, &value)) {
      Py_DECREF(seq);
      return -1;
    }
    if (PyLong_Check(value)) {
      long v = PyLong_AsLong(value);
      if (v == -1 && PyErr_Occurred()) {
        Py_DECREF(seq);
        return -1;
      }
      self->builder->AddChannelArgument(name, static_cast<int>(v));
    } else {
      const char* v = PyUnicode_AsUTF8(value);
      if (v == nullptr) {
        Py_DECREF(seq);
        return -1;
      }
      self->builder->AddChannelArgument(name, std::string(v));
    }
  }
  Py_DECREF(seq);
  self->builder->RegisterCallbackGenericService(self->service);
  return 0;
}

// add_port(address, key=None, chain=None, roots=None, require_client_auth=False) -> a
// placeholder filled by start(): grpc C++ binds at start. Without key and chain: insecure.
PyObject* server_add_port(ServerObject* self, PyObject* args) {
  const char* address;
  const char *key = nullptr, *chain = nullptr, *roots = nullptr;
  Py_ssize_t key_len = 0, chain_len = 0, roots_len = 0;
  int require_client_auth = 0;
  if (!PyArg_ParseTuple(args, "s|z#z#z#p", &address, &key, &key_len, &chain, &chain_len,
                        &roots, &roots_len, &require_client_auth))
    return nullptr;
  if (self->builder == nullptr || self->server != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "ports are added before start()");
    return nullptr;
  }
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (key != nullptr && chain != nullptr) {
    grpc::SslServerCredentialsOptions opts(
        roots == nullptr ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
        : require_client_auth ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                              : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
    opts.pem_key_cert_pairs.push_back({std::string(key, key_len), std::string(chain, chain_len)});
    if (roots != nullptr) opts.pem_root_certs = std::string(roots, roots_len);
    creds = grpc::SslServerCredentials(opts);
  } else {
    creds = grpc::InsecureServerCredentials();
  }
  int* port = new int(0);
  self->ports->push_back(port);
  self->builder->AddListeningPort(address, creds, port);
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(self->ports->size() - 1));
}

// start() -> [bound port of each add_port, in order]; 0 for one that could not bind.
PyObject* server_start(ServerObject* self, PyObject*) {
  if (self->builder == nullptr || self->server != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "already started");
    return nullptr;
  }
  std::unique_ptr<grpc::Server> server;
  {
    // gRPC starts the server's threads here (its callback pollers, event engine and
    // timers), and so do we: they inherit the policy.
    BatchPolicyScope policy(self->yield_io);
    Py_BEGIN_ALLOW_THREADS
    server = self->builder->BuildAndStart();
    Py_END_ALLOW_THREADS
    if (!server) {
      PyErr_SetString(PyExc_RuntimeError, "gRPC C++ could not start the server (a port taken?)");
      return nullptr;
    }
    self->server = server.release();
    self->reaper = new std::thread(reap, *self->queue);
    self->finisher = new std::thread(finisher, *self->queue);
    self->io_yielding = policy.applied;
  }
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(self->ports->size()));
  for (size_t i = 0; i < self->ports->size(); ++i)
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), PyLong_FromLong(*(*self->ports)[i]));
  return out;
}

// io_yielding() -> whether start() started its threads SCHED_BATCH (yield_io, where it took).
PyObject* server_io_yielding(ServerObject* self, PyObject*) {
  return PyBool_FromLong(self->io_yielding);
}

// next_call(timeout, min_age=0) -> the oldest queued call, or None when timeout seconds
// passed or the server closed. With min_age, only a call queued at least that many seconds
// ago, while the dispatcher (min_age 0) has taken none for as long: a spill thread takes
// what a held-up dispatcher has not got to.
PyObject* server_next_call(ServerObject* self, PyObject* args) {
  double timeout, min_age = 0.0;
  if (!PyArg_ParseTuple(args, "d|d", &timeout, &min_age)) return nullptr;
  Queue& q = **self->queue;
  auto age = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(min_age));
  bool spill = min_age > 0;
  // (Under q.mu.) When the oldest call may be taken: at once for the dispatcher; for a
  // spill thread once it is min_age old and the dispatcher has taken nothing for as long.
  auto due = [&q, age, spill]() {
    auto since = q.calls.front().second;
    if (spill && q.last_take > since) since = q.last_take;
    return since + age;
  };
  auto take = [&q, spill](std::shared_ptr<CallState>& state, Clock::time_point now) {
    state = std::move(q.calls.front().first);
    q.calls.pop_front();
    if (!spill) q.last_take = now;
  };
  std::shared_ptr<CallState> state;
  {
    std::lock_guard<std::mutex> l(q.mu);
    auto now = Clock::now();
    if (!q.calls.empty() && now >= due()) take(state, now);  // under load: the GIL kept
  }
  if (!state) {
    Py_BEGIN_ALLOW_THREADS
    {
      auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(timeout));
      std::unique_lock<std::mutex> l(q.mu);
      while (!q.closed) {
        auto now = Clock::now();
        if (!q.calls.empty() && now >= due()) {
          take(state, now);
          break;
        }
        if (now >= end) break;
        auto until = end;
        if (!q.calls.empty() && due() < until) until = due();
        if (spill) {
          q.aged_idle = q.calls.empty();
          q.aged_cv.wait_until(l, until);
        } else {
          q.cv.wait_until(l, until);
        }
      }
    }
    Py_END_ALLOW_THREADS
  }
  if (!state) Py_RETURN_NONE;
  return make_call(std::move(state), *self->queue);
}

// shutdown(grace): refuse new calls (UNAVAILABLE, calls still queued for Python too), wait
// up to grace seconds for the calls in flight, end those still running UNAVAILABLE, and
// stop. Their handlers may run on; what they send after is dropped.
PyObject* server_shutdown(ServerObject* self, PyObject* arg) {
  double grace = PyFloat_AsDouble(arg);
  if (grace == -1.0 && PyErr_Occurred()) return nullptr;
  Queue& q = **self->queue;
  if (self->server == nullptr) Py_RETURN_NONE;
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(grace));
  stop_reaper(self);  // (closes the queue)
  Py_BEGIN_ALLOW_THREADS
  std::deque<std::pair<std::shared_ptr<CallState>, Clock::time_point>> left;
  {
    std::lock_guard<std::mutex> l(q.mu);
    q.closed = true;
    left.swap(q.calls);
    while (!q.unsent.empty()) {
      auto st = q.unsent.front();
      take_unsent(q, *st);
      left.emplace_back(std::move(st), Clock::now());
    }
  }
  close(q);  // (closed already: this wakes its waiters)
  for (auto& item : left)
    finish(*item.first, grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"), {}, nullptr);
  std::vector<std::shared_ptr<CallState>> running;
  {
    std::unique_lock<std::mutex> l(q.live_mu);
    q.live_cv.wait_until(l, deadline, [&q] { return q.live.empty(); });
    for (auto& kv : q.live)
      if (auto st = kv.second.lock()) running.push_back(std::move(st));
  }
  // UNAVAILABLE, as a client of a closed connection sees it: clients retry it elsewhere.
  for (auto& st : running)
    finish(*st, grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shut down before the call "
                                                            "finished"), {}, nullptr);
  self->server->Shutdown(std::chrono::system_clock::now());
  self->server->Wait();
  Py_END_ALLOW_THREADS
  stop_finisher(self);
  Py_RETURN_NONE;
}

// end_unsent(code, message, keep_prefix) -> how many: end every call still waiting for its
// first message (a drain), but those whose method starts with keep_prefix (health checks).
PyObject* server_end_unsent(ServerObject* self, PyObject* args) {
  int code;
  const char *message, *keep;
  if (!PyArg_ParseTuple(args, "iss", &code, &message, &keep)) return nullptr;
  Queue& q = **self->queue;
  std::string prefix(keep);
  std::vector<std::shared_ptr<CallState>> ended;
  Py_BEGIN_ALLOW_THREADS
  {
    std::lock_guard<std::mutex> l(q.mu);
    for (auto it = q.unsent.begin(); it != q.unsent.end();) {
      auto st = *it++;
      if (st->method.compare(0, prefix.size(), prefix) != 0) {
        take_unsent(q, *st);
        ended.push_back(std::move(st));
      }
    }
  }
  for (auto& st : ended)
    finish(*st, grpc::Status(static_cast<grpc::StatusCode>(code), message), {}, nullptr);
  Py_END_ALLOW_THREADS
  return PyLong_FromSize_t(ended.size());
}

// require_auth(): calls without an authorization header go to Python before any message.
PyObject* server_require_auth(ServerObject* self, PyObject*) {
  (*self->queue)->auth_required = true;
  Py_RETURN_NONE;
}

// set_streaming(methods): the request-streaming methods ("/pkg.Service/Method"), before start.
PyObject* server_set_streaming(ServerObject* self, PyObject* methods) {
  if (self->server != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "set_streaming before start()");
    return nullptr;
  }
  PyObject* seq = PySequence_Fast(methods, "methods must be a sequence of str");
  if (seq == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char* m = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
    if (m == nullptr) {
      Py_DECREF(seq);
      return nullptr;
    }
    (*self->queue)->streaming.insert(m);
  }
  Py_DECREF(seq);
  Py_RETURN_NONE;
}

PyMethodDef server_methods[] = {
    {"require_auth", reinterpret_cast<PyCFunction>(server_require_auth), METH_NOARGS,
     "require_auth(): calls without an authorization header go to Python at once"},
    {"set_streaming", reinterpret_cast<PyCFunction>(server_set_streaming), METH_O,
     "set_streaming(methods): request-streaming methods, handed to Python at once"},
    {"end_unsent", reinterpret_cast<PyCFunction>(server_end_unsent), METH_VARARGS,
     "end_unsent(code, message, keep_prefix) -> calls ended"},
    {"add_port", reinterpret_cast<PyCFunction>(server_add_port), METH_VARARGS,
     "add_port(address, key=None, chain=None, roots=None, require_client_auth=False) -> index"},
    {"start", reinterpret_cast<PyCFunction>(server_start), METH_NOARGS, "start() -> bound ports"},
    {"io_yielding", reinterpret_cast<PyCFunction>(server_io_yielding), METH_NOARGS,
     "io_yielding() -> whether start() started its threads SCHED_BATCH"},
    {"next_call", reinterpret_cast<PyCFunction>(server_next_call), METH_VARARGS,
     "next_call(timeout, min_age=0) -> Call or None"},
    {"shutdown", reinterpret_cast<PyCFunction>(server_shutdown), METH_O, "shutdown(grace)"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject ServerType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_front", "lossd's native gRPC front (C++).", -1,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__front(void) {
  CallType.tp_name = "lossd_server._front.Call";
  CallType.tp_basicsize = sizeof(CallObject);
  CallType.tp_dealloc = reinterpret_cast<destructor>(call_dealloc);
  CallType.tp_flags = Py_TPFLAGS_DEFAULT;
  CallType.tp_doc = "One RPC, handed to Python by Server.next_call().";
  CallType.tp_methods = call_methods;
  CallType.tp_getset = call_getset;
  ServerType.tp_name = "lossd_server._front.Server";
  ServerType.tp_basicsize = sizeof(ServerObject);
  ServerType.tp_dealloc = reinterpret_cast<destructor>(server_dealloc);
  ServerType.tp_flags = Py_TPFLAGS_DEFAULT;
  ServerType.tp_doc = "A gRPC C++ server whose every call is handed to Python.";
  ServerType.tp_methods = server_methods;
  ServerType.tp_init = reinterpret_cast<initproc>(server_init);
  ServerType.tp_new = PyType_GenericNew;
  if (PyType_Ready(&CallType) < 0 || PyType_Ready(&ServerType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  Py_INCREF(&ServerType);
  if (PyModule_AddObject(m, "Server", reinterpret_cast<PyObject*>(&ServerType)) < 0) return nullptr;
  Py_INCREF(&CallType);
  if (PyModule_AddObject(m, "Call", reinterpret_cast<PyObject*>(&CallType)) < 0) return nullptr;
  return m;
}
