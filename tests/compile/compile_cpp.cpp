// Compile check: moe.h's implementation as C++17 at -Werror.
#define MOE_IMPLEMENTATION
#include "../../moe.h"

int compile_check_cpp();
int compile_check_cpp() {
    moe_config c = {};
    c = moe_preset_deepseek_v3();
    moe_info info = {};
    size_t bytes = 0;
    moe_status st = moe_forward_workspace_size(&c, 16, &bytes);
    if (st != MOE_STATUS_OK) info.workspace_required = bytes;
    return static_cast<int>(st) + static_cast<int>(info.workspace_required);
}
