/* OpenBLAS on a decoding step's products: `m` rows times every projection of a
 * SmolLM2-135M-shaped model (30 layers of q, k, v, o, gate, up, down, then the tied head),
 * the weights row-major `[out, in]` as hearth keeps them, each product's columns cut into
 * parts of `width` (0: one part per thread, as hearth did before) and the parts handed to
 * 2 threads, each part one single-threaded `cblas_sgemm` call, as kernels/src/cpu/blas.rs
 * does. Prints the best of 6 passes and the weight bytes read per second.
 * Build and run: benches/cpu/few-rows.sh */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

void cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int,
                 float, float *, int);
void openblas_set_num_threads(int);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

enum { LAYERS = 30, PER_LAYER = 7, THREADS = 2 };

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: few_rows ROWS WIDTH\n");
        return 2;
    }
    int m = atoi(argv[1]), width = atoi(argv[2]);
    openblas_set_num_threads(1);
    static const int shapes[PER_LAYER][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576},
                                             {1536, 576}, {1536, 576}, {576, 1536}};
    enum { COUNT = LAYERS * PER_LAYER + 1 };
    float *w[COUNT];
    int n_of[COUNT], k_of[COUNT];
    size_t bytes = 0;
    for (int i = 0; i < COUNT; i++) {
        n_of[i] = i < COUNT - 1 ? shapes[i % PER_LAYER][0] : 49152;
        k_of[i] = i < COUNT - 1 ? shapes[i % PER_LAYER][1] : 576;
        size_t len = (size_t)n_of[i] * k_of[i];
        w[i] = malloc(len * sizeof(float));
        for (size_t j = 0; j < len; j++) w[i][j] = (float)(j % 7) * 0.01f;
        bytes += len * sizeof(float);
    }
    float *x = malloc(sizeof(float) * m * 1536), *y = malloc(sizeof(float) * m * 49152);
    for (int i = 0; i < m * 1536; i++) x[i] = 0.5f;
    double best = 1e30;
    for (int pass = 0; pass < 6; pass++) {
        double start = now();
        for (int i = 0; i < COUNT; i++) {
            int n = n_of[i], k = k_of[i];
            int per = width > 0 ? width : (n + THREADS - 1) / THREADS;
            int parts = (n + per - 1) / per;
#pragma omp parallel for num_threads(THREADS) schedule(static)
            for (int p = 0; p < parts; p++) {
                int first = p * per, cols = n - first < per ? n - first : per;
                cblas_sgemm(101, 111, 112, m, cols, k, 1.0f, x, k, w[i] + (size_t)first * k, k,
                            0.0f, y + first, n);
            }
        }
        double t = now() - start;
        if (t < best) best = t;
    }
    printf("%d\t%d\t%.2f\t%.1f\n", m, width, best * 1e3, bytes / best / 1e9);
    return 0;
}
