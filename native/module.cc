// Entry point of snapblock_native; the typed facade is src/native/index.ts.
#include "common.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  snapblock::InitFileIo(env, exports);
  snapblock::InitSpace(env, exports);
  snapblock::InitMemory(env, exports);
  snapblock::InitSocketIo(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(snapblock_native, Init)
