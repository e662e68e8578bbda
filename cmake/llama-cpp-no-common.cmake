# Included by run.sh's llama-cpp-python build right after llama.cpp's own project() call
# (CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python's CMakeLists forces LLAMA_BUILD_COMMON on in the
# cache, but its Python bindings load only libllama and libggml: the common library (argument parsing,
# chat templates, the JSON-schema converter of llama.cpp's tools) is compiled for nothing. A normal variable
# set here shadows the cached one inside llama.cpp's directory, so it is neither built nor installed.
set(LLAMA_BUILD_COMMON OFF)
