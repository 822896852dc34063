/* CUDA graphs for the decode step (the graph hooks of blip2_cuda_ops, kernels/ops.h). A decode
 * step of OPT-2.7b is ~260 small launches; at batch 1 their CPU cost is about as long as the GPU
 * work, so replaying them as one graph is what lets the GPU run back to back. Recording uses the
 * thread-local capture mode: another thread's work (a second context, NCCL's proxy) is never
 * swept into this graph, and an op that must not be recorded (a sync, a cudaMalloc) fails the
 * recording instead of running. */
#include <stdio.h>
#include <stdlib.h>

#include "internal.cuh"

namespace {

struct step_graph {
    cudaGraphExec_t exec;
    unsigned scratch_gen; /* the context's scratch generation when recorded */
    int device;
};

blip2_cuda_ctx *graph_ctx(const char *what) {
    blip2_cuda_ctx *c = blip2_cuda_ctx_current();
    if (!c) blip2_cuda_record(NULL, "%s: no current CUDA context on this thread", what);
    return c;
}

} /* namespace */

int blip2_cuda_capture_begin(void) {
    blip2_cuda_ctx *c = graph_ctx("capture_begin");
    if (!c || c->has_err || c->capturing) return 1; /* an earlier error is reported by the next sync */
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return 1;
    }
    c->capturing = 1;
    return 0;
}

void *blip2_cuda_capture_end(char *why, size_t n) {
    blip2_cuda_ctx *c = graph_ctx("capture_end");
    if (!c) {
        if (why && n) snprintf(why, n, "no current CUDA context");
        return NULL;
    }
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    c->capturing = 0;
    cudaGraphExec_t exec = NULL;
    if (e == cudaSuccess && !c->has_err && g) e = cudaGraphInstantiate(&exec, g, 0);
    if (g) cudaGraphDestroy(g);
    if (e == cudaSuccess && !c->has_err && exec) {
        step_graph *sg = (step_graph *)malloc(sizeof *sg);
        if (sg) {
            *sg = step_graph{exec, c->scratch_gen, c->device};
            return sg;
        }
        if (why && n) snprintf(why, n, "out of host memory");
        cudaGraphExecDestroy(exec);
        return NULL;
    }
    /* Nothing recorded ran: drop the errors the recording raised so the eager rerun starts clean. */
    if (why && n) snprintf(why, n, "%s", c->has_err ? c->err : cudaGetErrorString(e));
    if (exec) cudaGraphExecDestroy(exec);
    c->has_err = 0;
    c->err[0] = 0;
    cudaGetLastError();
    return NULL;
}

int blip2_cuda_graph_launch(void *graph) {
    blip2_cuda_ctx *c = graph_ctx("graph_launch");
    step_graph *sg = (step_graph *)graph;
    if (!c || !sg) return -1;
    if (sg->scratch_gen != c->scratch_gen || sg->device != c->device) return 1;
    return CUDA_CK(c, cudaGraphLaunch(sg->exec, c->stream)) ? 0 : -1;
}

void blip2_cuda_graph_free(void *graph) {
    step_graph *sg = (step_graph *)graph;
    if (!sg) return;
    cudaGraphExecDestroy(sg->exec);
    free(sg);
}
