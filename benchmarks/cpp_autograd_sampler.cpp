// A measurement prototype, not a fastvae route: the sampler (fastvae_reparameterize_kl_forward and
// _backward of the native library) behind a torch::autograd::Function written in C++, so that an
// eager call never runs Python between the caller and the kernel. benchmarks/sampler_in_step.py
// builds it with torch.utils.cpp_extension and times it inside a training step beside fastvae's
// Python route. It takes float32 [B, L] rows with unit column stride and draws its seed from
// torch's default CPU generator as torch.randint(0, 2**62) does (random64 modulo the range), so a
// seed matches what fastvae.ops.noise.draw_seed would have drawn.
#include <ATen/CPUGeneratorImpl.h>
#include <dlfcn.h>
#include <torch/extension.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

namespace {

using Forward = int (*)(int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t, const void*,
                        int64_t, uint64_t, void*, void*, int);
using Backward = int (*)(int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t, const void*,
                         int64_t, const void*, int64_t, const void*, int64_t, uint64_t, void*, void*, int);
constexpr int kFloat32 = 0;  // FASTVAE_DTYPE_F32 of kernels/fastvae_native.h
constexpr uint64_t kSeedRange = uint64_t{1} << 62;

Forward forward_kernel = nullptr;
Backward backward_kernel = nullptr;

void bind(const std::string& library_path) {
    void* library = dlopen(library_path.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (library == nullptr) library = dlopen(library_path.c_str(), RTLD_NOW);
    if (library == nullptr) throw std::runtime_error("cannot open " + library_path);
    forward_kernel = reinterpret_cast<Forward>(dlsym(library, "fastvae_reparameterize_kl_forward"));
    backward_kernel = reinterpret_cast<Backward>(dlsym(library, "fastvae_reparameterize_kl_backward"));
    if (forward_kernel == nullptr || backward_kernel == nullptr)
        throw std::runtime_error(library_path + " lacks the sampler's kernels");
}

uint64_t draw_seed() {
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    return generator.get<at::CPUGeneratorImpl>()->random64() % kSeedRange;
}

const void* pointer_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
int64_t stride_or_zero(const torch::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

void check_status(int status, const char* kernel) {
    if (status != 0) throw std::runtime_error(std::string(kernel) + " failed with status " + std::to_string(status));
}

struct Sampler : public torch::autograd::Function<Sampler> {
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& mu,
                                                  const torch::Tensor& logvar) {
        TORCH_CHECK(mu.dim() == 2 && mu.scalar_type() == at::kFloat && mu.stride(1) == 1 && logvar.sizes() ==
                        mu.sizes() && logvar.scalar_type() == at::kFloat && logvar.stride(1) == 1,
                    "the prototype takes float32 [B, L] rows with unit column stride");
        const int64_t rows = mu.size(0), cols = mu.size(1);
        const uint64_t seed = draw_seed();
        auto z = torch::empty({rows, cols}, mu.options());
        auto kl = torch::empty({rows}, mu.options());
        check_status(forward_kernel(kFloat32, rows, cols, 1, mu.data_ptr(), mu.stride(0), logvar.data_ptr(),
                                    logvar.stride(0), nullptr, 0, seed, z.data_ptr(), kl.data_ptr(),
                                    at::get_num_threads()),
                     "fastvae_reparameterize_kl_forward");
        ctx->save_for_backward({mu, logvar});
        ctx->saved_data["seed"] = static_cast<int64_t>(seed);
        ctx->set_materialize_grads(false);  // an unused output's gradient arrives undefined: its term is skipped
        return {z, kl};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto& mu = saved[0];
        const auto& logvar = saved[1];
        const int64_t rows = mu.size(0), cols = mu.size(1);
        auto grad_z = grads[0].defined() ? grads[0].to(at::kFloat).contiguous() : grads[0];
        auto grad_kl = grads[1].defined() ? grads[1].to(at::kFloat) : grads[1];
        auto grad_mu = torch::empty({rows, cols}, mu.options());
        auto grad_logvar = torch::empty({rows, cols}, mu.options());
        check_status(backward_kernel(kFloat32, rows, cols, 1, pointer_or_null(grad_z), stride_or_zero(grad_z),
                                     pointer_or_null(grad_kl), stride_or_zero(grad_kl), mu.data_ptr(), mu.stride(0),
                                     logvar.data_ptr(), logvar.stride(0), nullptr, 0,
                                     static_cast<uint64_t>(ctx->saved_data["seed"].toInt()), grad_mu.data_ptr(),
                                     grad_logvar.data_ptr(), at::get_num_threads()),
                     "fastvae_reparameterize_kl_backward");
        return {grad_mu, grad_logvar};
    }
};

torch::autograd::variable_list reparameterize_kl(const torch::Tensor& mu, const torch::Tensor& logvar) {
    TORCH_CHECK(forward_kernel != nullptr, "call bind(path of _native_cpu.so) first");
    return Sampler::apply(mu, logvar);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("bind", &bind, "find the sampler's kernels in the native library at this path");
    module.def("reparameterize_kl", &reparameterize_kl, "(mu, logvar) -> [z, kl], differentiable");
}
