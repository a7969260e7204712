// The work split our packed-weight GEMMs share (layers/csrc/bf16_gemm.cpp, layers/csrc/int8_gemm.cpp):
// parallel over groups of up to NR blocks of 16 outputs, and within a group every row in tiles of MR
// rows, the group's weights staying in L2 while the rows pass over them (each weight read from memory
// once per call). The kernels supply the tile; tile sizes are template arguments, so each tail shape
// is its own fully unrolled tile. tinyserve/native.py keys every kernel's build on this file's text.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace tinyserve {

template <int N>
using Const = std::integral_constant<int, N>;

// tile(Const<mr>, row) for rows [row, row + mr) of m: full tiles of 4, then one of the remaining 1-3.
template <typename Tile>
inline void row_tiles(int64_t m, Tile&& tile) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) tile(Const<4>{}, i);
  switch (m - i) {
    case 1: tile(Const<1>{}, i); break;
    case 2: tile(Const<2>{}, i); break;
    case 3: tile(Const<3>{}, i); break;
    default: break;
  }
}

// group(Const<nr>, first block) for groups of 6 blocks (the last one 1-6), in parallel.
template <typename Group>
inline void block_groups(int64_t blocks, Group&& group) {
  at::parallel_for(0, (blocks + 5) / 6, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t b0 = g * 6;
      switch (std::min<int64_t>(6, blocks - b0)) {
        case 6: group(Const<6>{}, b0); break;
        case 5: group(Const<5>{}, b0); break;
        case 4: group(Const<4>{}, b0); break;
        case 3: group(Const<3>{}, b0); break;
        case 2: group(Const<2>{}, b0); break;
        default: group(Const<1>{}, b0); break;
      }
    }
  });
}

}  // namespace tinyserve
