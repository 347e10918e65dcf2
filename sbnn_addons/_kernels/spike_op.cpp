// The CPU implementation of the operator sbnn_addons::spike_forward (defined, with its
// fake implementation, in sbnn_addons/kernels.py) as a C++ kernel of the dispatcher: a
// compiled graph calls it once per neuron and time step, and this skips the Python
// implementation's dispatch and ctypes call (about 12 us a call). It computes exactly
// what kernels._spike_forward_impl computes: the same checks and messages, the same
// Philox key drawn from the global generator, the same call of sbnn_spike_forward
// (spike.c, loaded before this library with its symbols global).
//
// Built by sbnn_addons.kernels with the C++ compiler against the installed torch's
// headers, on first use, and registered by sbnn_register_operator; where it cannot be
// built, the Python implementation stays.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

extern "C" double sbnn_spike_forward(const float *u, const float *var, int64_t mid,
                                     int64_t inner, float *h, uint8_t *hb, int64_t total,
                                     uint64_t seed, int at_zero, int want_aux, float offset,
                                     int threads);

namespace {

void check_input(const char *name, const at::Tensor &t) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
                     " must be a torch.float32 CPU tensor for the fused kernel, got torch.",
                     c10::getDtypeNames(t.scalar_type()).first, " on ", t.device(),
                     "; use sbnn_addons.IWSTSpike or sample_spikes, which take the PyTorch "
                     "path otherwise");
}

std::string shape_text(at::IntArrayRef shape) {  // Python's tuple form: (6, 40), (6,), ()
    std::string s = "(";
    for (size_t d = 0; d < shape.size(); ++d)
        s += std::to_string(shape[d]) + (d + 1 < shape.size() || shape.size() == 1 ? ", " : "");
    if (shape.size() == 1) s.pop_back();
    return s + ")";
}

// The variance in the kernel's layout and (mid, inner) (kernels._layout_of): the
// variance of element e of u is var[(e / (mid inner)) inner + e % inner].
std::tuple<at::Tensor, int64_t, int64_t> layout(const at::Tensor &u, const at::Tensor &var) {
    auto shape = u.sizes(), vshape = var.sizes();
    const int64_t nd = static_cast<int64_t>(shape.size());
    if (vshape.equals(shape)) return {var.contiguous(), 1, 1};
    if (vshape.empty()) return {var.contiguous(), std::max<int64_t>(u.numel(), 1), 1};
    const int64_t pad = nd - static_cast<int64_t>(vshape.size());
    bool fits = pad >= 0;
    for (int64_t d = 0; fits && d < nd - pad; ++d)
        fits = vshape[d] == shape[d + pad] || vshape[d] == 1;
    TORCH_CHECK_VALUE(fits, "variance of shape ", shape_text(vshape),
                      " does not broadcast to the drive u of shape ", shape_text(shape),
                      " (it must not enlarge u)");
    int64_t first = -1, last = -1;
    for (int64_t d = 0; d < nd; ++d) {
        int64_t vd = d < pad ? 1 : vshape[d - pad];
        if (vd != shape[d]) {
            if (first < 0) first = d;
            last = d + 1;
        }
    }
    for (int64_t d = first; d < last; ++d)
        if ((d < pad ? 1 : vshape[d - pad]) != 1)  // broadcast dimensions not one block
            return {var.expand(shape).contiguous(), 1, 1};
    int64_t mid = 1, inner = 1;
    for (int64_t d = first; d < last; ++d) mid *= shape[d];
    for (int64_t d = last; d < nd; ++d) inner *= shape[d];
    return {var.contiguous(), mid, inner};
}

// The 64-bit Philox key of kernels._seed(None): random_() of a 0-dim int64 tensor from the
// global generator (random64() modulo 2^63, ATen's uniform_int for int64).
uint64_t draw_key() {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    uint64_t bits = at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
    return bits % (static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spike_forward(
    const at::Tensor &u_in, const at::Tensor &variance, bool at_zero,
    std::optional<double> aux_offset, const std::optional<at::Tensor> & /*after*/) {
    check_input("u", u_in);
    check_input("variance", variance);
    at::Tensor u = u_in.contiguous();
    auto [var, mid, inner] = layout(u, variance);
    at::Tensor hb = at::empty(u.sizes(), u.options().dtype(at::kByte));
    double aux = sbnn_spike_forward(u.const_data_ptr<float>(), var.const_data_ptr<float>(),
                                    mid, inner, nullptr, hb.mutable_data_ptr<uint8_t>(),
                                    u.numel(), draw_key(), at_zero, aux_offset.has_value(),
                                    static_cast<float>(aux_offset.value_or(0.0)),
                                    at::get_num_threads());
    at::Tensor z2 = aux_offset.has_value() ? at::scalar_tensor(aux, u.options())
                                           : at::zeros({}, u.options());
    return {hb, z2, at::empty({0}, u.options().dtype(at::kByte))};
}

std::unique_ptr<torch::Library> registration;  // alive while the kernel serves the operator

}  // namespace

// Registers the kernel for the CPU (called by kernels._install_operator once the operator is
// defined; not at load time, where an error would end the process). Returns 0, or 1 with
// the error's message in `message`.
extern "C" int sbnn_register_operator(char *message, size_t size) {
    try {
        auto library = std::make_unique<torch::Library>(
            torch::Library::IMPL, "sbnn_addons", c10::DispatchKey::CPU, __FILE__, __LINE__);
        library->impl("spike_forward", &spike_forward);
        registration = std::move(library);
        return 0;
    } catch (const std::exception &exc) {
        std::snprintf(message, size, "%s", exc.what());
        return 1;
    }
}
