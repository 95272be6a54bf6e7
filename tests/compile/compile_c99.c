/* Compile check: moe.h's implementation in a C99 translation unit at -Werror
   (built by `make compile-checks` with default, MOE_STATIC, MOE_NO_SIMD and
   ISA flags).                                                               */
#define MOE_IMPLEMENTATION
#include "../../moe.h"

int compile_check_c99(void);
int compile_check_c99(void) {
    moe_config c = moe_preset_mixtral();
    size_t bytes = 0;
    return (int)moe_forward_workspace_size(&c, 16, &bytes);
}
