// Library-level queries: ABI version (Python refuses a stale build) and OpenMP.
#include "fastvae_native.h"

extern "C" int fastvae_abi_version(void) { return FASTVAE_ABI_VERSION; }

extern "C" int fastvae_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
