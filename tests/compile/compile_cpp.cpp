// Compile check: moe.h's implementation as C++17 at -Werror.
#define MOE_IMPLEMENTATION
#include "../../moe.h"

int compile_check_cpp();
int compile_check_cpp() {
    moe_config c = {};
    c = moe_preset_deepseek_v3();
    moe_info info = {};
    size_t bytes = 0;
    (void)info;
    return static_cast<int>(moe_forward_workspace_size(&c, 16, &bytes));
}
