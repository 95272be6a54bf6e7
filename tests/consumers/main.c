/* A consumer of an installed (or added) moe.h: tests/consumers/run.sh builds
   this against pkg-config's flags, CMake's find_package(moe) and
   add_subdirectory. One small layer forward; exit status 0 when it returns
   OK and y is the hand-computed answer. */
#define MOE_IMPLEMENTATION
#include <moe.h>
#include <math.h>
#include <stdio.h>

int main(void) {
    /* E = 2 experts, top-1, D = F = 2, ReLU: the router sends x = (1, 2) to
       expert 1 (logits 1 and 2), whose gate is the identity and down 3x:
       y = softmax weight 1 (renormalised top-1) * 3 * relu(x) = (3, 6) */
    const float router[4] = {1, 0, 0, 1};
    const float gate[8] = {1, 0, 0, 1, 1, 0, 0, 1};
    const float down[8] = {1, 0, 0, 1, 3, 0, 0, 3};
    const float x[2] = {1, 2};
    float y[2] = {0, 0};
    moe_config c = {0};
    moe_weights w = {0};
    moe_status s;
    c.num_experts = 2; c.top_k = 1; c.d_model = 2; c.d_ff = 2;
    c.activation = MOE_ACT_RELU;
    w.router = router; w.gate = gate; w.down = down;
    s = moe_forward_alloc(&c, &w, x, 1, y, NULL);
    printf("moe.h %s: %s, y = (%g, %g)\n", MOE_VERSION_STRING, moe_status_string(s), y[0], y[1]);
    return s != MOE_STATUS_OK || fabsf(y[0] - 3.0f) > 1e-6f || fabsf(y[1] - 6.0f) > 1e-6f;
}
