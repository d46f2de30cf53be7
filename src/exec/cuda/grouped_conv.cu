// Grouped and depthwise 2-D convolution (NCHW), one thread per output element.
//
// candle runs a convolution with G groups as G separate convolutions (each an im2col and a
// cuBLAS product) and a concatenation: MobileNetV2's depthwise layers became thousands of
// launches, 200+ ms a frame on an H200. Here a group's few input channels are summed in
// place, with the padding read as zeros instead of materialised.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

struct ConvShape {
    int n, cin, h, w;         // input
    int cout, oh, ow;         // output
    int kh, kw;               // kernel
    int sh, sw, ph, pw, dh, dw;  // strides, leading pads, dilations
    int cin_g, cout_g;        // input and output channels per group
};

__device__ __forceinline__ float load(const float *p) { return *p; }
__device__ __forceinline__ float load(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float *p, float v) { *p = v; }
__device__ __forceinline__ void store(__half *p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__device__ void grouped_conv2d(const ConvShape s, const T *__restrict__ x,
                               const T *__restrict__ wt, T *__restrict__ y) {
    const long long total = (long long)s.n * s.cout * s.oh * s.ow;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int ox = (int)(i % s.ow);
        long long t = i / s.ow;
        const int oy = (int)(t % s.oh);
        t /= s.oh;
        const int oc = (int)(t % s.cout);
        const int b = (int)(t / s.cout);
        const int g = oc / s.cout_g;
        const int iy0 = oy * s.sh - s.ph;
        const int ix0 = ox * s.sw - s.pw;
        float acc = 0.f;
        for (int ci = 0; ci < s.cin_g; ++ci) {
            const T *xc = x + ((long long)b * s.cin + (long long)g * s.cin_g + ci) * s.h * s.w;
            const T *wc = wt + ((long long)oc * s.cin_g + ci) * s.kh * s.kw;
            for (int ky = 0; ky < s.kh; ++ky) {
                const int iy = iy0 + ky * s.dh;
                if (iy < 0 || iy >= s.h) continue;
                for (int kx = 0; kx < s.kw; ++kx) {
                    const int ix = ix0 + kx * s.dw;
                    if (ix < 0 || ix >= s.w) continue;
                    acc += load(xc + (long long)iy * s.w + ix) * load(wc + ky * s.kw + kx);
                }
            }
        }
        store(y + i, acc);
    }
}

extern "C" __global__ void grouped_conv2d_f32(const ConvShape s, const float *x, const float *w,
                                              float *y) {
    grouped_conv2d(s, x, w, y);
}
extern "C" __global__ void grouped_conv2d_f16(const ConvShape s, const __half *x, const __half *w,
                                              __half *y) {
    grouped_conv2d(s, x, w, y);
}
extern "C" __global__ void grouped_conv2d_bf16(const ConvShape s, const __nv_bfloat16 *x,
                                               const __nv_bfloat16 *w, __nv_bfloat16 *y) {
    grouped_conv2d(s, x, w, y);
}

// A convolution's epilogue in one pass: per-channel bias, an optional residual of the output's
// shape, and a clamp to [lo, hi] (ReLU: [0, inf); ReLU6: [0, 6]; none: unbounded). candle
// spends one launch on each, and two on a clamp. A NaN stays NaN, as ONNX's Clip keeps it.
template <typename T, bool RES>
__device__ void bias_act(long long total, int c, long long hw, const T *__restrict__ y,
                         const T *__restrict__ b, const T *__restrict__ r, T *__restrict__ out,
                         float lo, float hi) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float v = load(y + i) + load(b + (i / hw) % c);
        if (RES) v += load(r + i);
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        store(out + i, v);
    }
}

#define BIAS_ACT(NAME, T)                                                                     \
    extern "C" __global__ void bias_act_##NAME(long long total, int c, long long hw,          \
                                               const T *y, const T *b, T *out, float lo,      \
                                               float hi) {                                    \
        bias_act<T, false>(total, c, hw, y, b, nullptr, out, lo, hi);                         \
    }                                                                                         \
    extern "C" __global__ void bias_res_act_##NAME(long long total, int c, long long hw,      \
                                                   const T *y, const T *b, const T *r, T *out, \
                                                   float lo, float hi) {                      \
        bias_act<T, true>(total, c, hw, y, b, r, out, lo, hi);                                \
    }
BIAS_ACT(f32, float)
BIAS_ACT(f16, __half)
BIAS_ACT(bf16, __nv_bfloat16)
