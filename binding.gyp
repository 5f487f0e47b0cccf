{
  "targets": [
    {
      "target_name": "snapblock_native",
      "sources": [
        "native/common.cc",
        "native/file_io.cc",
        "native/space.cc",
        "native/memory.cc",
        "native/socket_io.cc",
        "native/module.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions", "-O3"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags": ["-O2"],
      "cflags_cc": ["-std=c++17", "-fexceptions"]
    }
  ]
}
