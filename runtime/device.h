/* Choosing the backend a model runs on: "cpu" (the C reference, always there) or "cuda" (when
 * the build has it and a GPU is present). The switch between the two builds is a file boundary:
 * runtime/device_cuda.c or runtime/device_cpu.c is compiled, never both. */
#ifndef BLIP2_DEVICE_H
#define BLIP2_DEVICE_H

#include "../kernels/ops.h"
#include "../parallel/comm.h"
#include "status.h"

typedef struct {
    const blip2_ops *ops;
    void *ctx;   /* the CUDA context of this thread (NULL on the CPU) */
    int index;   /* GPU ordinal */
    blip2_comm *host_comm; /* the communicator a NCCL one replaced in tp (open_tp/close_tp) */
    char name[128];
} blip2_device;

/* Opens `name` ("cpu" or "cuda") for the calling thread; for CUDA, GPU `index` (callers pass the
 * local rank modulo the device count: see blip2_device_count). A clear error when the build or
 * the machine lacks it. */
blip2_code blip2_device_open(const char *name, int index, blip2_device *d, blip2_status *st);
void blip2_device_close(blip2_device *d);
/* The same for work that must not delay the main queue (the image encoder beside the decode
 * steps): on CUDA its stream has the lowest priority. */
blip2_code blip2_device_open_background(const char *name, int index, blip2_device *d, blip2_status *st);
/* The op table of a device name without opening it (for communicators built before the shards'
 * threads open their contexts); NULL when unknown or not in this build. */
const blip2_ops *blip2_device_ops(const char *name);
/* GPUs visible to this process (0 without CUDA). */
int blip2_device_count(void);
/* The GPU ordinal of the calling thread's CUDA context (0 without one): another thread opens the
 * same device with blip2_device_open(ops->name, this) to get a queue of its own. */
int blip2_device_current_index(void);
/* For a rank of a tensor-parallel group: opens GPU (local rank mod GPUs) and, for CUDA under
 * mpirun, puts a NCCL communicator over tp->comm in its place (*nccl, freed by close_tp; the
 * original stays the host plane). CPU or a single process: tp is left as it is. Not collective
 * on failure paths: callers agree on the outcome with blip2_tp_agree afterwards. */
blip2_code blip2_device_open_tp(const char *name, blip2_tp *tp, blip2_device *d, blip2_comm **nccl, blip2_status *st);
void blip2_device_close_tp(blip2_device *d, blip2_comm *nccl, blip2_tp *tp);
/* The build switch (device_cuda.c or device_cpu.c): open/close a CUDA device, its op table. */
blip2_code blip2_device_open_cuda(int index, int background, blip2_device *d, blip2_status *st);
void blip2_device_close_cuda(blip2_device *d);
const blip2_ops *blip2_device_cuda_ops(void);
/* "f32" | "f16" | "bf16" → BLIP2_W_*, or -1. */
int blip2_wdtype_parse(const char *s);
const char *blip2_wdtype_name(int wdtype);

#endif
