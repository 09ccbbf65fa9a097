// Host emulator for the kernel files: compiled with g++ (`-include emu.h -DKS_EMU`) into one shared
// library per family by src/backend/cuda/emu.rs, so that every kernel and every launcher runs, and
// is checked against the CPU oracle, on a machine without a GPU (CI has none).
//
// Model: one block at a time; each CUDA thread is a fiber (ucontext) on its own guarded stack, run
// until it reaches a barrier, in an order that alternates between phases (see run_block). `__syncthreads` releases when every live thread of the block waits on
// it; warp-synchronous operations (shuffles, mma.sync, ldmatrix) release when every live lane of the
// warp waits on one. `__shared__` variables are function statics, which is shared memory exactly
// when blocks run one after another. Whatever real hardware would leave undefined is reported as an
// error naming the kernel instead: a barrier some threads never reach (divergent __syncthreads), a
// shuffle from an exited lane, lanes of a warp at different warp operations, an mma or ldmatrix
// without the whole warp, a misaligned ldmatrix row, a launch whose argument count or sizes differ
// from the kernel's parameters.
//
// The PTX primitives common.cuh writes as inline assembly are emulated from the PTX ISA's
// definitions (fragment layouts of mma.m16n8k16 and ldmatrix .trans; cvt round-to-nearest-even),
// which is what makes this a check of the tensor-core code rather than a copy of it.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define KS_EMU 1
#define __device__
#define __host__
#define __forceinline__ inline
#define __global__ __attribute__((used))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// ---- math builtins ------------------------------------------------------------------------------
template <class A, class B> inline typename std::common_type<A, B>::type min(A a, B b) { return b < a ? b : a; }
template <class A, class B> inline typename std::common_type<A, B>::type max(A a, B b) { return a < b ? b : a; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace ks_emu {

constexpr size_t kStack = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;

enum State : int { Ready, AtBlockBarrier, AtWarpBarrier, Done };

// Switching fibers is most of the emulator's time; glibc's swapcontext makes a sigprocmask system
// call per switch, so x86-64 gets a plain register switch (the callee-saved registers and the
// stack pointer, which is all a cooperative switch at a call boundary has to keep).
// -DKS_EMU_UCONTEXT forces the portable path (how it is tested on x86-64).
#if defined(__x86_64__) && !defined(KS_EMU_UCONTEXT)
__attribute__((naked, noinline)) inline void switch_stack(void** /*save*/, void* /*load*/) {
    asm volatile(
        "pushq %rbp\n pushq %rbx\n pushq %r12\n pushq %r13\n pushq %r14\n pushq %r15\n"
        "movq %rsp, (%rdi)\n"
        "movq %rsi, %rsp\n"
        "popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %rbx\n popq %rbp\n"
        "ret\n");
}
#define KS_EMU_FAST_SWITCH 1
#endif

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr; // saved stack pointer (fast switch)
    char* stack = nullptr; // kStack usable bytes above one PROT_NONE guard page
    State state = Done;
    unsigned long long warp_ops = 0; // warp-synchronous operations reached, to catch divergence
};

// What one lane publishes to its warp at a warp-synchronous operation.
struct Lane {
    unsigned long long v;
    const void* p;
    unsigned a[4], b[2];
    float c[4];
};

struct Machine {
    std::vector<Fiber> fibers;
    std::vector<Lane> lanes;
    ucontext_t sched;
    void* sched_sp = nullptr;
    unsigned cur = 0, nthreads = 0;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    std::string error;
};
inline Machine M;

inline void fail(const std::string& msg);

inline unsigned me() { return M.cur; }
inline unsigned warp_base() { return M.cur & ~31u; }
inline unsigned warp_end() { return min(warp_base() + 32u, M.nthreads); }

// From the running fiber back to the scheduler.
inline void to_scheduler() {
    Fiber& f = M.fibers[M.cur];
#ifdef KS_EMU_FAST_SWITCH
    switch_stack(&f.sp, M.sched_sp);
#else
    swapcontext(&f.ctx, &M.sched);
#endif
}

// From the scheduler into fiber i.
inline void to_fiber(unsigned i) {
#ifdef KS_EMU_FAST_SWITCH
    switch_stack(&M.sched_sp, M.fibers[i].sp);
#else
    swapcontext(&M.sched, &M.fibers[i].ctx);
#endif
}

inline void wait(State s) {
    M.fibers[M.cur].state = s;
    to_scheduler();
}

// Reports the first error and leaves the fiber for good (it is re-made at the next block).
inline void fail(const std::string& msg) {
    if (M.error.empty()) {
        char where[160];
        std::snprintf(where, sizeof where, " (block (%u,%u,%u), thread (%u,%u,%u))", blockIdx.x, blockIdx.y, blockIdx.z,
                      threadIdx.x, threadIdx.y, threadIdx.z);
        M.error = msg + where;
    }
    M.fibers[M.cur].state = Done;
    to_scheduler();
}

inline void warp_sync() {
    M.fibers[M.cur].warp_ops++;
    wait(AtWarpBarrier);
}

// The whole warp must take part (mma.sync and ldmatrix are .aligned: every lane, none exited).
inline void require_full_warp(const char* what) {
    if (warp_end() - warp_base() != 32) fail(std::string(what) + " in a partial warp");
    for (unsigned i = warp_base(); i < warp_end(); ++i)
        if (M.fibers[i].state == Done) fail(std::string(what) + " with an exited lane");
}

inline void entry() {
    M.body(M.body_arg);
    M.fibers[M.cur].state = Done;
#ifdef KS_EMU_FAST_SWITCH
    to_scheduler(); // never resumed: the fiber is re-made for the next block
    __builtin_unreachable();
#endif
    // (ucontext) returning resumes uc_link, the scheduler.
}

inline bool make_stacks(unsigned n) {
    while (M.fibers.size() < n) {
        const size_t page = 4096;
        void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
        mprotect(p, page, PROT_NONE); // stack overflow faults instead of corrupting a neighbour
        Fiber f;
        f.stack = static_cast<char*>(p) + page;
        M.fibers.push_back(f);
    }
    if (M.lanes.size() < n) M.lanes.resize(n);
    return true;
}

inline void set_thread(unsigned linear) {
    threadIdx.x = linear % blockDim.x;
    threadIdx.y = (linear / blockDim.x) % blockDim.y;
    threadIdx.z = linear / (blockDim.x * blockDim.y);
}

// Runs lanes [w0, w1) of the current block until each has exited or waits at __syncthreads.
// False with M.error set on a failure.
inline bool run_warp(unsigned w0, unsigned w1, bool reverse) {
    for (;; reverse = !reverse) {
        for (unsigned k = w0; k < w1; ++k) {
            const unsigned i = reverse ? w1 - 1 - (k - w0) : k;
            if (M.fibers[i].state != Ready) continue;
            M.cur = i;
            set_thread(i);
            to_fiber(i);
            if (!M.error.empty()) return false;
        }
        unsigned live = 0, at_warp = 0;
        unsigned long long ops = 0;
        bool same = true;
        for (unsigned i = w0; i < w1; ++i) {
            const Fiber& f = M.fibers[i];
            if (f.state == Done) continue;
            if (live == 0) ops = f.warp_ops;
            same = same && f.warp_ops == ops;
            ++live;
            at_warp += f.state == AtWarpBarrier;
        }
        if (at_warp == 0) return true; // all exited or at __syncthreads
        char s[192];
        if (at_warp != live) {
            std::snprintf(s, sizeof s,
                          "deadlock in block (%u,%u,%u), warp %u: %u lanes at a warp operation, %u at __syncthreads "
                          "(a barrier inside divergent code?)",
                          blockIdx.x, blockIdx.y, blockIdx.z, w0 / 32, at_warp, live - at_warp);
            M.error = s;
            return false;
        }
        if (!same) {
            std::snprintf(s, sizeof s, "lanes of warp %u reached different warp-synchronous operations", w0 / 32);
            M.error = s;
            return false;
        }
        for (unsigned i = w0; i < w1; ++i)
            if (M.fibers[i].state == AtWarpBarrier) M.fibers[i].state = Ready;
    }
}

// cp.async copies issued by each thread of the block and not yet waited for (see cp_async_16).
struct PendingCopy {
    unsigned short* dst;
    unsigned char bytes[16];
};
inline std::vector<std::vector<PendingCopy>> cp_pending;

// Runs the current block (blockIdx set) to completion. False with M.error set on a failure.
inline bool run_block() {
    const unsigned n = M.nthreads;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = M.fibers[i];
#ifdef KS_EMU_FAST_SWITCH
        // The frame switch_stack pops: six zeroed registers, then `entry` as the return address,
        // then a dummy return address for entry itself (16-byte alignment as after a call).
        void** top = reinterpret_cast<void**>(f.stack + kStack);
        top[-1] = nullptr;
        top[-2] = reinterpret_cast<void*>(&entry);
        for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
        f.sp = top - 8;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &M.sched;
        makecontext(&f.ctx, entry, 0);
#endif
        f.state = Ready;
        f.warp_ops = 0;
    }
    cp_pending.assign(n, {});
    // Warps run one after another up to the next __syncthreads (warp-level operations resolve inside
    // the warp, without touching the rest of the block). Warps, and the lanes inside a warp, run in
    // ascending order in one phase and descending in the next, starting the other way round in odd
    // blocks, so a read of another thread's write that lacks a barrier sees a different value in
    // some phase and fails the parity check.
    bool reverse = (blockIdx.x + blockIdx.y + blockIdx.z) & 1u;
    const unsigned nw = (n + 31) / 32;
    for (;; reverse = !reverse) {
        for (unsigned k = 0; k < nw; ++k) {
            const unsigned w = reverse ? nw - 1 - k : k;
            if (!run_warp(w * 32, min(w * 32 + 32, n), reverse)) return false;
        }
        unsigned live = 0;
        for (unsigned i = 0; i < n; ++i) {
            if (M.fibers[i].state == Done) continue;
            ++live;
            M.fibers[i].state = Ready; // every live thread is at __syncthreads now
        }
        if (live == 0) return true;
    }
}

// ---- launch -------------------------------------------------------------------------------------
struct LaunchArgs {
    unsigned grid[3];
    unsigned block[3];
    unsigned smem;
    unsigned nargs;
    void** args;
    const unsigned* arg_sizes;
    char* err;
    unsigned errlen;
};

template <class... A, size_t... I>
inline void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}

template <class... A> struct Bound {
    void (*f)(A...);
    void** args;
    static void run(void* self) {
        Bound* b = static_cast<Bound*>(self);
        call(b->f, b->args, std::index_sequence_for<A...>{});
    }
};

inline int report(const LaunchArgs* l, const std::string& msg) {
    if (l->errlen) {
        std::snprintf(l->err, l->errlen, "%s", msg.c_str());
    }
    return 1;
}

template <class... A> inline int launch(void (*f)(A...), const LaunchArgs* l) {
    const unsigned sizes[] = {0u, static_cast<unsigned>(sizeof(A))...};
    if (l->nargs != sizeof...(A)) {
        return report(l, "launched with " + std::to_string(l->nargs) + " arguments; the kernel takes " +
                             std::to_string(sizeof...(A)));
    }
    for (unsigned i = 0; i < l->nargs; ++i) {
        if (l->arg_sizes[i] != sizes[i + 1]) {
            return report(l, "argument " + std::to_string(i) + " is " + std::to_string(l->arg_sizes[i]) +
                                 " bytes; the kernel's parameter is " + std::to_string(sizes[i + 1]));
        }
    }
    if (l->smem != 0) return report(l, "dynamic shared memory is not used by any kstyle kernel");
    const unsigned n = l->block[0] * l->block[1] * l->block[2];
    if (n == 0 || n > kMaxThreads) return report(l, "block of " + std::to_string(n) + " threads");
    if (!make_stacks(n)) return report(l, "no memory for fiber stacks");
    Bound<A...> bound{f, l->args};
    M.body = &Bound<A...>::run;
    M.body_arg = &bound;
    M.nthreads = n;
    M.error.clear();
    blockDim = dim3{l->block[0], l->block[1], l->block[2]};
    gridDim = dim3{l->grid[0], l->grid[1], l->grid[2]};
    for (unsigned z = 0; z < l->grid[2]; ++z)
        for (unsigned y = 0; y < l->grid[1]; ++y)
            for (unsigned x = 0; x < l->grid[0]; ++x) {
                blockIdx = uint3{x, y, z};
                if (!run_block()) return report(l, M.error);
            }
    return 0;
}

// ---- numeric conversions (PTX cvt semantics) -----------------------------------------------------
// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline unsigned short f32_to_bf16(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

// f32 -> IEEE binary16, round to nearest even, with subnormals, overflow to inf, NaN kept.
inline unsigned short f32_to_f16(float x) {
    const unsigned u = __float_as_uint(x);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned ax = u & 0x7fffffffu;
    if (ax > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u); // rounds past 65504
    const int e = static_cast<int>(ax >> 23) - 127;
    if (e >= -14) {
        // Normal half: keep 10 mantissa bits, round the 13 dropped ones to nearest even.
        unsigned m = ax & 0x7fffffu;
        unsigned h = (static_cast<unsigned>(e + 15) << 10) | (m >> 13);
        const unsigned rest = m & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h; // a carry into the exponent is right
        return static_cast<unsigned short>(sign | h);
    }
    if (e < -25) return static_cast<unsigned short>(sign); // below half the smallest subnormal
    // Subnormal half: value = m_full * 2^(e - 23); in units of 2^-24 that is m_full >> (-e - 1).
    const unsigned m = (ax & 0x7fffffu) | 0x800000u;
    const int shift = -e - 1; // 14..24
    unsigned h = m >> shift;
    const unsigned rest = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return static_cast<unsigned short>(sign | h);
}

inline float f16_to_f32(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        const float v = std::ldexp(static_cast<float>(m), -24);
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline float bf16_to_f32(unsigned short h) { return __uint_as_float(static_cast<unsigned>(h) << 16); }

} // namespace ks_emu

// ---- the primitives common.cuh defines with inline PTX ------------------------------------------
inline void __syncthreads() { ks_emu::wait(ks_emu::AtBlockBarrier); }

template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    using namespace ks_emu;
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu) fail("only full-warp shuffles are emulated");
    std::memcpy(&M.lanes[me()].v, &v, sizeof(T));
    warp_sync();
    const unsigned src = warp_base() + (((me() & 31u) ^ static_cast<unsigned>(lane_mask)) & 31u);
    if (src >= warp_end() || M.fibers[src].state == Done) fail("__shfl_xor_sync reads an exited or absent lane");
    T r;
    std::memcpy(&r, &M.lanes[src].v, sizeof(T));
    warp_sync();
    return r;
}

inline unsigned short cvt_rn_bf16(float x) { return ks_emu::f32_to_bf16(x); }
inline unsigned short cvt_rn_f16(float x) { return ks_emu::f32_to_f16(x); }
inline float cvt_f32_f16(unsigned short h) { return ks_emu::f16_to_f32(h); }
// cvt.rn.bf16x2.f32 d, hi, lo: lo in bits 0-15.
inline unsigned cvt_rn_bf16x2(float lo, float hi) {
    return static_cast<unsigned>(ks_emu::f32_to_bf16(lo)) | (static_cast<unsigned>(ks_emu::f32_to_bf16(hi)) << 16);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, fragments as the PTX ISA lays them out
// (group g = lane / 4, t = lane % 4; the lower-indexed element in the low 16 bits):
//   A (16 x 16): a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..)
//   B (16 x 8):  b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t + 8.., n = g)
//   C, D (16 x 8 f32): c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..2t+1)
inline void mma_bf16_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    using namespace ks_emu;
    require_full_warp("mma.sync");
    Lane& L = M.lanes[me()];
    for (int i = 0; i < 4; ++i) L.a[i] = a[i];
    L.b[0] = b0;
    L.b[1] = b1;
    warp_sync();
    const Lane* W = &M.lanes[warp_base()];
    auto half = [](unsigned reg, unsigned k) { return static_cast<unsigned short>(reg >> (16 * (k & 1u))); };
    auto A = [&](unsigned row, unsigned k) {
        const unsigned reg = (row >= 8 ? 1u : 0u) + (k >= 8 ? 2u : 0u);
        return bf16_to_f32(half(W[(row % 8) * 4 + (k % 8) / 2].a[reg], k));
    };
    auto B = [&](unsigned k, unsigned n) { return bf16_to_f32(half(W[n * 4 + (k % 8) / 2].b[k >= 8], k)); };
    const unsigned lane = me() & 31u, g = lane >> 2, t = lane & 3u;
    float d[4];
    for (unsigned e = 0; e < 4; ++e) {
        const unsigned row = g + (e >= 2 ? 8u : 0u), col = 2 * t + (e & 1u);
        double s = 0.0; // products of bf16 are exact in f32; the sum is rounded once
        for (unsigned k = 0; k < 16; ++k) s += static_cast<double>(A(row, k)) * B(k, col);
        d[e] = static_cast<float>(c[e] + s);
    }
    warp_sync();
    for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16: lanes 0-7 address the eight 16-byte rows of
// matrix 0, lanes 8-15 those of matrix 1. With .trans, register i of lane (g = lane / 4,
// t = lane % 4) holds elements (row 2t, col g) and (row 2t + 1, col g) of matrix i.
namespace ks_emu {
// ldmatrix's first half: every lane of the (whole) warp passes one row address; returns the
// warp's lanes once all have.
inline const Lane* ldmatrix_rows(const unsigned short* row) {
    require_full_warp("ldmatrix");
    M.lanes[me()].p = row;
    warp_sync();
    return &M.lanes[warp_base()];
}
// The row address lane `i` of the warp passed, which must be 16-byte aligned.
inline const unsigned short* ldmatrix_row(const Lane* W, unsigned i) {
    const unsigned short* p = static_cast<const unsigned short*>(W[i].p);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
    return p;
}
} // namespace ks_emu

inline void ldmatrix_x2_trans(const unsigned short* row, unsigned& r0, unsigned& r1) {
    using namespace ks_emu;
    const Lane* W = ldmatrix_rows(row);
    const unsigned lane = me() & 31u, g = lane >> 2, t = lane & 3u;
    unsigned out[2];
    for (unsigned i = 0; i < 2; ++i) {
        unsigned v = 0;
        for (unsigned j = 0; j < 2; ++j) v |= static_cast<unsigned>(ldmatrix_row(W, i * 8 + 2 * t + j)[g]) << (16 * j);
        out[i] = v;
    }
    warp_sync();
    r0 = out[0];
    r1 = out[1];
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 address the rows of matrix i; without
// .trans, register i of lane (g, t) holds (row g, col 2t) low and (row g, col 2t + 1) high.
inline void ldmatrix_x4(const unsigned short* row, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    using namespace ks_emu;
    const Lane* W = ldmatrix_rows(row);
    const unsigned lane = me() & 31u, g = lane >> 2, t = lane & 3u;
    unsigned out[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned short* p = ldmatrix_row(W, i * 8 + g);
        out[i] = static_cast<unsigned>(p[2 * t]) | (static_cast<unsigned>(p[2 * t + 1]) << 16);
    }
    warp_sync();
    r0 = out[0];
    r1 = out[1];
    r2 = out[2];
    r3 = out[3];
}

// cp.async.cg 16 bytes: the source is read at issue, and the bytes land in shared memory only at
// this thread's next cp.async.wait_group 0, the first point where the hardware guarantees them,
// so a tile read before its wait and barrier reads stale data here too and fails parity.
inline void cp_async_16(unsigned short* dst, const void* src, int src_bytes) {
    using namespace ks_emu;
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
        fail("cp.async address not 16-byte aligned");
    if (src_bytes != 0 && src_bytes != 16) fail("cp.async src_bytes must be 0 or 16 here");
    PendingCopy c{dst, {}};
    if (src_bytes) std::memcpy(c.bytes, src, 16);
    cp_pending[me()].push_back(c);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
    using namespace ks_emu;
    for (const PendingCopy& c : cp_pending[me()]) std::memcpy(c.dst, c.bytes, 16);
    cp_pending[me()].clear();
}

#define KS_EMU_EXPORT(name)                                                                                    \
    extern "C" int ks_emu_launch_##name(const ks_emu::LaunchArgs* l) { return ks_emu::launch(name, l); }
