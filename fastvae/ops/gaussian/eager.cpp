// The sampler's eager CPU route in C++: fastvae_eager::reparameterize_kl, an operator whose
// autograd is a torch::autograd::Function written here, so that a plain eager call on the native
// backend runs no Python between the caller and the kernels of kernels/gaussian.cpp.
//
// Why: inside a training step every Python line runs with cold caches and costs about ten times
// its warm price; a Python autograd.Function, a seed draw and a ctypes call cost the sampler
// about 205 µs there, this route 130 (the operator itself about 90; docs/design.md, "The eager
// path").
//
// fastvae/ops/eager_extension.py builds this file against the running torch on first use and
// calls it for the calls it can take; it computes exactly what the Python route computes
// (fastvae/ops/gaussian/op.py: _reparameterize_kl and _reparameterize_kl_grads), which
// tests/test_eager_extension.py checks bit for bit:
//   - mu, logvar [B, ...] CPU, one dtype of four, read as rows [B, N] (a view when the layout has
//     unit column stride, else a copy); z [B, ...] ([K, B, ...] with samples K) in that dtype,
//     kl [B] in float32 (float64 for float64 inputs), and the seed used, a 0-d int64 tensor;
//   - the seed is the one given, else drawn from torch's default CPU generator as
//     torch.randint(0, 2**62) draws it (fastvae.ops.noise.draw_seed);
//   - backward runs the backward kernel; when a graph is being recorded (create_graph=True) it
//     calls fastvae::reparameterize_kl_graph_backward, the Python op that differentiates the
//     op's composite, so that second derivatives are the composite's.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

namespace {

// The kernels' C signatures, as kernels/gaussian.cpp defines them (tests/test_native_abi.py checks
// these two lines against the prototypes fastvae/ops/gaussian/native.py declares).
// ABI forward: int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t, const void*, int64_t, uint64_t, void*, void*, int
// ABI backward: int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t, const void*, int64_t, const void*, int64_t, const void*, int64_t, uint64_t, void*, void*, int
using ForwardKernel = int (*)(int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t,
                              const void*, int64_t, uint64_t, void*, void*, int);
using BackwardKernel = int (*)(int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t,
                               const void*, int64_t, const void*, int64_t, const void*, int64_t, uint64_t, void*,
                               void*, int);

ForwardKernel forward_kernel = nullptr;
BackwardKernel backward_kernel = nullptr;
constexpr uint64_t kSeedRange = uint64_t{1} << 62;  // fastvae.ops.noise.SEED_HIGH

void bind(std::string library_path) {
    void* library = dlopen(library_path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // fastvae has loaded it already
    if (library == nullptr) library = dlopen(library_path.c_str(), RTLD_NOW);
    TORCH_CHECK(library != nullptr, "fastvae_eager: cannot open ", library_path, ": ", dlerror());
    forward_kernel = reinterpret_cast<ForwardKernel>(dlsym(library, "fastvae_reparameterize_kl_forward"));
    backward_kernel = reinterpret_cast<BackwardKernel>(dlsym(library, "fastvae_reparameterize_kl_backward"));
    TORCH_CHECK(forward_kernel != nullptr && backward_kernel != nullptr, "fastvae_eager: ", library_path,
                " lacks the sampler's kernels: the native library is stale");
}

int dtype_code(at::ScalarType dtype) {  // FASTVAE_F32, _F64, _BF16, _F16 of kernels/fastvae_native.h
    switch (dtype) {
        case at::kFloat: return 0;
        case at::kDouble: return 1;
        case at::kBFloat16: return 2;
        case at::kHalf: return 3;
        default: TORCH_CHECK(false, "fastvae_eager: the native kernels take float32, float64, bfloat16 or float16");
    }
}

at::ScalarType loss_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// t [B, ...] as rows [B, N] with unit column stride (fastvae.ops.common.as_rows).
at::Tensor as_rows(const at::Tensor& t) {
    at::Tensor rows = t.dim() == 2 ? t : t.reshape({t.size(0), -1});
    return rows.size(1) > 1 && rows.stride(1) != 1 ? rows.contiguous() : rows;
}

// K samples [K, B, ...] as rows [K * B, N]; [B, ...] as rows when samples is None (as_sample_rows).
at::Tensor as_sample_rows(const at::Tensor& t, std::optional<int64_t> samples) {
    return as_rows(samples ? t.flatten(0, 1) : t);
}

std::vector<int64_t> sample_shape(const at::Tensor& like, std::optional<int64_t> samples) {
    std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
    if (samples) shape.insert(shape.begin(), *samples);
    return shape;
}

uint64_t draw_seed() {
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    return generator.get<at::CPUGeneratorImpl>()->random64() % kSeedRange;
}

uint64_t seed_value(const at::Tensor& seed) {
    const int64_t value = seed.item<int64_t>();
    TORCH_CHECK(value >= 0, "native backend: seed ", value, " must be >= 0 (fastvae draws seeds in [0, 2**62))");
    return static_cast<uint64_t>(value);
}

void check_status(int status, const char* kernel) {
    TORCH_CHECK(status == 0, "native backend: ", kernel, status == 1 ? " does not support this dtype" : " failed",
                " (status ", status, ")");
}

const void* pointer_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
int64_t stride_or_zero(const at::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

struct Sampler : public torch::autograd::Function<Sampler> {
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& mu,
                                                  const at::Tensor& logvar, const std::optional<at::Tensor>& seed,
                                                  std::optional<int64_t> samples) {
        const uint64_t seed_used = seed ? seed_value(*seed) : draw_seed();
        const auto dtype = mu.scalar_type();
        const int64_t count = samples.value_or(1);
        at::Tensor z, kl;
        if (mu.numel() == 0) {
            z = at::empty(sample_shape(mu, samples), mu.options());
            kl = at::zeros({mu.size(0)}, mu.options().dtype(loss_dtype(dtype)));
        } else {
            const at::Tensor m = as_rows(mu), lv = as_rows(logvar);
            const int64_t rows = m.size(0), cols = m.size(1);
            z = at::empty({count * rows, cols}, mu.options());
            kl = at::empty({rows}, mu.options().dtype(loss_dtype(dtype)));
            check_status(forward_kernel(dtype_code(dtype), rows, cols, count, m.data_ptr(), m.stride(0),
                                        lv.data_ptr(), lv.stride(0), nullptr, 0, seed_used, z.data_ptr(),
                                        kl.data_ptr(), at::get_num_threads()),
                         "fastvae_reparameterize_kl_forward");
            z = z.view(sample_shape(mu, samples));
        }
        ctx->save_for_backward({mu, logvar});
        ctx->saved_data["seed"] = static_cast<int64_t>(seed_used);
        ctx->saved_data["samples"] = samples ? c10::IValue(*samples) : c10::IValue();
        // An output the caller did not use arrives as an undefined gradient: its term is skipped.
        ctx->set_materialize_grads(false);
        auto seed_tensor = at::scalar_tensor(static_cast<int64_t>(seed_used), mu.options().dtype(at::kLong));
        ctx->mark_non_differentiable({seed_tensor});
        return {z, kl, seed_tensor};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const at::Tensor& grad_z = grads[0];
        const at::Tensor& grad_kl = grads[1];
        const torch::autograd::variable_list none(4);
        if (!grad_z.defined() && !grad_kl.defined()) return none;
        const auto saved = ctx->get_saved_variables();
        const at::Tensor& mu = saved[0];
        const at::Tensor& logvar = saved[1];
        const auto seed = static_cast<int64_t>(ctx->saved_data["seed"].toInt());
        const auto& samples_value = ctx->saved_data["samples"];
        const std::optional<int64_t> samples =
            samples_value.isNone() ? std::nullopt : std::optional<int64_t>(samples_value.toInt());
        if (at::GradMode::is_enabled()) {  // create_graph=True: the composite's differentiable backward
            static const auto graph_backward =
                c10::Dispatcher::singleton()
                    .findSchemaOrThrow("fastvae::reparameterize_kl_graph_backward", "")
                    .typed<std::tuple<at::Tensor, at::Tensor>(
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, std::optional<int64_t>, bool, bool)>();
            auto [grad_mu, grad_logvar] = graph_backward.call(
                grad_z.defined() ? std::optional<at::Tensor>(grad_z) : std::nullopt,
                grad_kl.defined() ? std::optional<at::Tensor>(grad_kl) : std::nullopt, mu, logvar,
                at::scalar_tensor(seed, mu.options().dtype(at::kLong)), samples, ctx->needs_input_grad(0),
                ctx->needs_input_grad(1));
            return {grad_mu, grad_logvar, at::Tensor(), at::Tensor()};
        }
        if (mu.numel() == 0) return {at::zeros_like(mu), at::zeros_like(logvar), at::Tensor(), at::Tensor()};
        // One storage dtype for the kernel (fastvae.ops.common.storage_dtype): mu's, unless an upstream
        // gradient comes in another, then the compute dtype.
        const auto dtype = mu.scalar_type();
        const auto storage = !grad_z.defined() || grad_z.scalar_type() == dtype ? dtype : loss_dtype(dtype);
        const at::Tensor m = as_rows(mu).to(storage), lv = as_rows(logvar).to(storage);
        const int64_t rows = m.size(0), cols = m.size(1);
        const at::Tensor gz = grad_z.defined() ? as_sample_rows(grad_z.to(storage), samples) : grad_z;
        // Any element stride, 0 included: the backward of kl.sum() hands over one value expanded.
        const at::Tensor gk = grad_kl.defined() ? grad_kl.to(loss_dtype(dtype)) : grad_kl;
        auto grad_mu = at::empty({rows, cols}, m.options());
        auto grad_logvar = at::empty({rows, cols}, m.options());
        check_status(backward_kernel(dtype_code(storage), rows, cols, samples.value_or(1), pointer_or_null(gz),
                                     stride_or_zero(gz), pointer_or_null(gk), stride_or_zero(gk), m.data_ptr(),
                                     m.stride(0), lv.data_ptr(), lv.stride(0), nullptr, 0,
                                     gz.defined() ? static_cast<uint64_t>(seed) : 0, grad_mu.data_ptr(),
                                     grad_logvar.data_ptr(), at::get_num_threads()),
                     "fastvae_reparameterize_kl_backward");
        return {grad_mu.to(dtype).view(mu.sizes()), grad_logvar.to(dtype).view(logvar.sizes()), at::Tensor(),
                at::Tensor()};
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                                 const std::optional<at::Tensor>& seed,
                                                                 std::optional<int64_t> samples) {
    TORCH_CHECK(forward_kernel != nullptr, "fastvae_eager: bind() the native library first");
    auto outputs = Sampler::apply(mu, logvar, seed, samples);
    return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY(fastvae_eager, library) {
    library.def("bind(str library_path) -> ()", &bind);
    library.def("reparameterize_kl(Tensor mu, Tensor logvar, Tensor? seed, int? samples) -> (Tensor, Tensor, Tensor)",
                &reparameterize_kl);
}
