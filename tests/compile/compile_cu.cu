// Compile check: moe.h's implementation inside a CUDA translation unit (host
// code), built by `make compile-checks` when nvcc is on PATH.
#define MOE_IMPLEMENTATION
#include "../../moe.h"

int compile_check_cu();
int compile_check_cu() {
    moe_config c = moe_preset_qwen2_moe();
    size_t bytes = 0;
    moe_status st = moe_forward_workspace_size(&c, 16, &bytes);
    return st == MOE_STATUS_OK && bytes > 0 ? 0 : 1;
}
