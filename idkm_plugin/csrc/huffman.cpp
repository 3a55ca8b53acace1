// Canonical Huffman payloads of idkm_plugin/export/huffman.py, encoded and decoded on one thread.
//
//   huffman_decode(payload uint8 [nbytes], block_bits int64 [B], lengths int64 [A], count, block, pack_bits)
//       -> symbols int64 [count] (pack_bits 0), or the codes packed at pack_bits bits, uint8 [ceil(count * pack_bits / 8)]
//   huffman_encode(symbols int64 [N], lengths int64 [A], block) -> (block_bits int64 [B], payload uint8 [*])
//
// The payload is the codes MSB first, blocks of `block` symbols back to back; block_bits gives each block's
// length in bits. Decoding reads 8 bytes at a time (the next >= 57 stream bits) and looks the next 12 bits up
// in a table of the (up to 6) whole codes they hold, for alphabets of <= 256 symbols, or the next P bits in a
// one-symbol table (P = min(longest code, 11)); longer codes are resolved canonically from their length's
// first code. Several blocks are decoded interleaved, since each block starts at a known bit. Every length
// is checked: a corrupted stream raises ValueError ("corrupted Huffman stream: ...") and no read leaves the
// payload (blocks whose worst-case reads could pass its end are decoded from a zero-padded copy of the tail).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "huffman.cpp packs codes with little-endian stores");

namespace {

constexpr int kMaxLength = 24;    // the format's longest code (a code at any bit offset fits in 32 bits)
constexpr int kPrimaryBits = 11;  // bits looked up in one step; longer codes take the canonical path
constexpr int kLanes = 4;         // blocks decoded interleaved

#define HUFFMAN_CORRUPT(cond, ...) TORCH_CHECK_VALUE(cond, "corrupted Huffman stream: ", __VA_ARGS__)

// The canonical code of one length table: codes of one length are consecutive, in symbol order,
// shorter lengths first (first_code[l + 1] = (first_code[l] + count[l]) << 1).
struct Code {
  int longest = 0;
  int primary = 0;                      // P: bits of the lookup table
  std::vector<uint32_t> table;          // [2**P]: (symbol << 5) | length, 0 = no code of <= P bits here
  std::vector<int64_t> first_code;      // [longest + 1]
  std::vector<int64_t> count;           // [longest + 1]
  std::vector<int64_t> first_index;     // [longest + 1]: position of the length's first symbol in `sorted`
  std::vector<int32_t> sorted;          // symbols in canonical order
  std::vector<uint32_t> codes;          // [A]: each symbol's code (encode)
};

Code build_code(const at::Tensor& lengths_tensor) {
  TORCH_CHECK_VALUE(lengths_tensor.dim() == 1 && lengths_tensor.scalar_type() == at::kLong,
                    "huffman: lengths must be int64 [n_symbols], got ", lengths_tensor.scalar_type(), " ",
                    lengths_tensor.sizes());
  const at::Tensor lengths_c = lengths_tensor.contiguous();
  const int64_t* lengths = lengths_c.data_ptr<int64_t>();
  const int64_t n = lengths_c.numel();
  TORCH_CHECK_VALUE(n >= 1 && n <= (int64_t(1) << 24), "huffman: ", n, " symbols (allowed: 1..2**24)");
  Code code;
  for (int64_t s = 0; s < n; ++s) {
    HUFFMAN_CORRUPT(lengths[s] >= 0 && lengths[s] <= kMaxLength, "symbol ", s, " has code length ", lengths[s],
                    " (allowed: 0..", kMaxLength, ")");
    code.longest = std::max<int>(code.longest, static_cast<int>(lengths[s]));
  }
  HUFFMAN_CORRUPT(code.longest > 0, "no symbol has a code");
  const int longest = code.longest;
  code.count.assign(longest + 1, 0);
  for (int64_t s = 0; s < n; ++s) code.count[lengths[s]] += 1;
  code.count[0] = 0;
  code.first_code.assign(longest + 1, 0);
  code.first_index.assign(longest + 1, 0);
  for (int l = 1; l <= longest; ++l) {
    if (l > 1) {
      code.first_code[l] = (code.first_code[l - 1] + code.count[l - 1]) << 1;
      code.first_index[l] = code.first_index[l - 1] + code.count[l - 1];
    }
    HUFFMAN_CORRUPT(code.first_code[l] + code.count[l] <= (int64_t(1) << l),
                    "its code lengths do not form a prefix code");
  }
  code.sorted.resize(code.first_index[longest] + code.count[longest]);
  code.codes.assign(n, 0);
  std::vector<int64_t> next(code.first_index);
  for (int64_t s = 0; s < n; ++s) {
    const int l = static_cast<int>(lengths[s]);
    if (l == 0) continue;
    const int64_t rank = next[l]++ - code.first_index[l];
    code.sorted[code.first_index[l] + rank] = static_cast<int32_t>(s);
    code.codes[s] = static_cast<uint32_t>(code.first_code[l] + rank);
  }
  code.primary = std::min(longest, kPrimaryBits);
  const int p = code.primary;
  code.table.assign(size_t(1) << p, 0);
  for (int l = 1; l <= std::min(longest, p); ++l) {
    for (int64_t r = 0; r < code.count[l]; ++r) {
      const uint32_t entry = (static_cast<uint32_t>(code.sorted[code.first_index[l] + r]) << 5) | l;
      const uint64_t lo = static_cast<uint64_t>(code.first_code[l] + r) << (p - l);
      std::fill(code.table.begin() + lo, code.table.begin() + lo + (uint64_t(1) << (p - l)), entry);
    }
  }
  return code;
}

inline uint64_t load_be64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}

// One symbol from the stream bits MSB-aligned in `window` (>= 57 valid): (symbol << 5) | length.
inline uint32_t next_symbol(const Code& code, uint64_t window) {
  const uint32_t entry = code.table[window >> (64 - code.primary)];
  if (entry != 0) return entry;
  for (int l = code.primary + 1; l <= code.longest; ++l) {  // codes longer than P bits (rare)
    const int64_t value = static_cast<int64_t>(window >> (64 - l));
    if (value < code.first_code[l] + code.count[l]) {
      const int32_t symbol = code.sorted[code.first_index[l] + (value - code.first_code[l])];
      return (static_cast<uint32_t>(symbol) << 5) | l;
    }
  }
  return 0;  // no code starts with these bits (an incomplete code)
}

// Decodes `n_lanes` blocks at once, lane j from bit start[j] of `data`, counts[j] symbols into out[j].
// The caller guarantees that every 8-byte read stays inside `data`. Returns each lane's end bit in `start`.
template <int Lanes>
void decode_lanes(const Code& code, const uint64_t* /*multi: alphabets > 256 have none*/, const uint8_t* data,
                  int64_t* start, const int64_t* counts, int32_t* const* out) {
  int64_t common = counts[0];
  for (int j = 1; j < Lanes; ++j) common = std::min(common, counts[j]);
  int64_t pos[Lanes];
  for (int j = 0; j < Lanes; ++j) pos[j] = start[j];
  const int shift = 64 - code.primary;
  const uint32_t* table = code.table.data();
  for (int64_t i = 0; i < common; ++i) {
    for (int j = 0; j < Lanes; ++j) {
      const uint64_t window = load_be64(data + (pos[j] >> 3)) << (pos[j] & 7);
      uint32_t entry = table[window >> shift];
      if (__builtin_expect(entry == 0, 0)) {
        entry = next_symbol(code, window);
        HUFFMAN_CORRUPT(entry != 0, "bits at payload bit ", pos[j], " start no code");
      }
      out[j][i] = static_cast<int32_t>(entry >> 5);
      pos[j] += entry & 31;
    }
  }
  for (int j = 0; j < Lanes; ++j) {  // the rest of longer lanes (only the last block is shorter)
    for (int64_t i = common; i < counts[j]; ++i) {
      const uint64_t window = load_be64(data + (pos[j] >> 3)) << (pos[j] & 7);
      const uint32_t entry = next_symbol(code, window);
      HUFFMAN_CORRUPT(entry != 0, "bits at payload bit ", pos[j], " start no code");
      out[j][i] = static_cast<int32_t>(entry >> 5);
      pos[j] += entry & 31;
    }
    start[j] = pos[j];
  }
}

// Alphabets of <= 256 symbols: a 2**12-entry table gives every symbol whose code lies wholly in the next
// 12 bits, up to 6 of them: bits 0-7 the bits they take, 8-15 their number (0: a code longer than 12 bits,
// or no code, left to next_symbol), then one byte per symbol.
constexpr int kMultiBits = 12;
constexpr int kMultiMax = 6;

std::vector<uint64_t> build_multi(const Code& code) {
  std::vector<uint64_t> table(size_t(1) << kMultiBits, 0);
  for (uint64_t x = 0; x < table.size(); ++x) {
    int rest = kMultiBits, n = 0, used = 0;
    uint64_t symbols = 0;
    while (n < kMultiMax && rest > 0) {
      const uint64_t window = (x & ((uint64_t(1) << rest) - 1)) << (64 - rest);  // the bits left, then zeros
      const uint32_t entry = next_symbol(code, window);
      const int length = static_cast<int>(entry & 31);
      if (entry == 0 || length > rest) break;  // the next code needs bits past these 12
      symbols |= static_cast<uint64_t>(entry >> 5) << (8 * n);
      ++n;
      used += length;
      rest -= length;
    }
    table[x] = n == 0 ? 0 : (symbols << 16) | (static_cast<uint64_t>(n) << 8) | static_cast<uint64_t>(used);
  }
  return table;
}

// Lanes of `decode_lanes` over a multi-symbol table, while every lane has room for 6 more symbols (each
// lookup stores 8 bytes at out[j] + i[j]: out rows hold block + 8 bytes).
template <int Lanes>
void multi_loop(const Code& code, const uint64_t* multi, const uint8_t* data, int64_t* pos, int64_t* i,
                const int64_t* counts, uint8_t* const* out) {
  for (;;) {
    bool room = true;
    for (int j = 0; j < Lanes; ++j) room &= i[j] + kMultiMax <= counts[j];
    if (!room) return;
    for (int j = 0; j < Lanes; ++j) {
      const uint64_t window = load_be64(data + (pos[j] >> 3)) << (pos[j] & 7);
      const uint64_t entry = multi[window >> (64 - kMultiBits)];
      if (__builtin_expect(entry != 0, 1)) {
        const uint64_t symbols = entry >> 16;
        std::memcpy(out[j] + i[j], &symbols, 8);
        i[j] += (entry >> 8) & 0xFF;
        pos[j] += entry & 0xFF;
      } else {
        const uint32_t one = next_symbol(code, window);
        HUFFMAN_CORRUPT(one != 0, "bits at payload bit ", pos[j], " start no code");
        out[j][i[j]++] = static_cast<uint8_t>(one >> 5);
        pos[j] += one & 31;
      }
    }
  }
}

template <int Lanes>
void decode_lanes(const Code& code, const uint64_t* multi, const uint8_t* data, int64_t* start,
                  const int64_t* counts, uint8_t* const* out) {
  int64_t pos[Lanes], i[Lanes];
  for (int j = 0; j < Lanes; ++j) {
    pos[j] = start[j];
    i[j] = 0;
  }
  multi_loop<Lanes>(code, multi, data, pos, i, counts, out);
  for (int j = 0; j < Lanes; ++j) {  // each lane's last symbols on its own, the last 5 one at a time
    multi_loop<1>(code, multi, data, pos + j, i + j, counts + j, out + j);
    for (; i[j] < counts[j]; ++i[j]) {
      const uint64_t window = load_be64(data + (pos[j] >> 3)) << (pos[j] & 7);
      const uint32_t entry = next_symbol(code, window);
      HUFFMAN_CORRUPT(entry != 0, "bits at payload bit ", pos[j], " start no code");
      out[j][i[j]] = static_cast<uint8_t>(entry >> 5);
      pos[j] += entry & 31;
    }
    start[j] = pos[j];
  }
}

// The decoded symbols [c] of one block go out as int64 (pack_bits 0) or packed LSB first at pack_bits
// bits per code, as idkm_plugin.nn.packing.pack_codes writes them: 8 codes fill pack_bits bytes.
template <typename T>
void emit(const T* symbols, int64_t c, int64_t first, int pack_bits, at::Tensor& result) {
  if (pack_bits == 0) {
    int64_t* out = result.data_ptr<int64_t>() + first;
    for (int64_t i = 0; i < c; ++i) out[i] = symbols[i];
    return;
  }
  uint8_t* out = result.data_ptr<uint8_t>() + first / 8 * pack_bits;  // first is a multiple of 8
  const int64_t total = result.numel();
  uint8_t* end = result.data_ptr<uint8_t>() + total;
  for (int64_t g = 0; g < c; g += 8, out += pack_bits) {
    unsigned __int128 word = 0;
    const int64_t in_group = std::min<int64_t>(8, c - g);
    for (int64_t i = 0; i < in_group; ++i) word |= static_cast<unsigned __int128>(symbols[g + i]) << (i * pack_bits);
    const int64_t nbytes = std::min<int64_t>(pack_bits, end - out);
    std::memcpy(out, &word, static_cast<size_t>(nbytes));  // little-endian: the low bytes first
  }
}

// Every block: kLanes at a time from the payload in place, then the rest one at a time (from `tail`, the
// zero-padded copy of the payload from byte tail_from, for blocks >= in_place); each must end where the
// next one starts. T: uint8_t (multi-symbol table) for alphabets of <= 256 symbols, else int32_t.
template <typename T>
void decode_blocks(const Code& code, const std::vector<uint64_t>& multi, const uint8_t* data,
                   const std::vector<int64_t>& starts, int64_t in_place, int64_t tail_from,
                   const std::vector<uint8_t>& tail, int64_t count, int64_t block, int64_t pack_bits,
                   at::Tensor& result) {
  const int64_t n_blocks = static_cast<int64_t>(starts.size()) - 1;
  const int64_t row = block + 8;
  std::vector<T> buffer(static_cast<size_t>(kLanes * row));
  const auto finish = [&](int64_t b, int64_t end, const T* symbols) {
    HUFFMAN_CORRUPT(end == starts[b + 1], "block ", b, " ends at bit ", end, ", expected ", starts[b + 1]);
    emit(symbols, std::min(block, count - b * block), b * block, static_cast<int>(pack_bits), result);
  };
  int64_t b = 0;
  for (; b + kLanes <= in_place; b += kLanes) {
    int64_t pos[kLanes], counts[kLanes];
    T* outs[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      pos[j] = starts[b + j];
      counts[j] = std::min(block, count - (b + j) * block);
      outs[j] = buffer.data() + j * row;
    }
    decode_lanes<kLanes>(code, multi.data(), data, pos, counts, outs);
    for (int j = 0; j < kLanes; ++j) finish(b + j, pos[j], outs[j]);
  }
  for (; b < n_blocks; ++b) {
    const bool copy = b >= in_place;
    int64_t pos = starts[b] - (copy ? tail_from * 8 : 0);
    const int64_t symbols = std::min(block, count - b * block);
    T* outs[1] = {buffer.data()};
    decode_lanes<1>(code, multi.data(), copy ? tail.data() : data, &pos, &symbols, outs);
    finish(b, pos + (copy ? tail_from * 8 : 0), buffer.data());
  }
}

at::Tensor huffman_decode(const at::Tensor& payload, const at::Tensor& block_bits, const at::Tensor& lengths,
                          int64_t count, int64_t block, int64_t pack_bits) {
  TORCH_CHECK_VALUE(payload.dim() == 1 && payload.scalar_type() == at::kByte && payload.device().is_cpu(),
                    "huffman_decode: payload must be a CPU uint8 [nbytes] tensor");
  TORCH_CHECK_VALUE(block_bits.dim() == 1 && block_bits.scalar_type() == at::kLong,
                    "huffman_decode: block_bits must be int64 [blocks]");
  TORCH_CHECK_VALUE(count >= 0 && block >= 8 && block % 8 == 0 && block <= (int64_t(1) << 20),
                    "huffman_decode: count=", count, ", block=", block, " (a multiple of 8 up to 2**20)");
  TORCH_CHECK_VALUE(pack_bits >= 0 && pack_bits <= 16, "huffman_decode: pack_bits=", pack_bits,
                    " (0: int64 symbols, 1..16: packed codes)");
  const Code code = build_code(lengths);
  TORCH_CHECK_VALUE(pack_bits == 0 || lengths.numel() <= (int64_t(1) << pack_bits), "huffman_decode: ",
                    lengths.numel(), " symbols do not fit in codes of ", pack_bits, " bits");
  const int64_t n_blocks = (count + block - 1) / block;
  HUFFMAN_CORRUPT(block_bits.numel() == n_blocks, block_bits.numel(), " block lengths for ", count,
                  " symbols in blocks of ", block);
  const at::Tensor bits_c = block_bits.contiguous();
  const int64_t* bits = bits_c.data_ptr<int64_t>();
  const at::Tensor data_c = payload.contiguous();
  const uint8_t* data = data_c.data_ptr<uint8_t>();
  const int64_t nbytes = data_c.numel();

  // Block starts; every block holds 1..longest bits per symbol and all of them fit in the payload.
  std::vector<int64_t> starts(n_blocks + 1, 0);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t symbols = std::min(block, count - b * block);
    HUFFMAN_CORRUPT(bits[b] >= symbols && bits[b] <= symbols * code.longest, "block ", b, " holds ", bits[b],
                    " bits for ", symbols, " symbols");
    starts[b + 1] = starts[b] + bits[b];
  }
  HUFFMAN_CORRUPT((starts[n_blocks] + 7) / 8 <= nbytes, "its blocks hold ", starts[n_blocks], " bits, the payload ",
                  nbytes, " bytes");

  at::Tensor result = pack_bits == 0 ? at::empty({count}, at::kLong)
                                     : at::empty({(count * pack_bits + 7) / 8}, at::kByte);
  // A block of c symbols from bit s reads bytes below ((s + (c - 1) * longest) >> 3) + 8, whatever the bits.
  // Blocks that stay below nbytes read the payload in place; the others a zero-padded copy of its tail.
  const auto read_end = [&](int64_t b) {
    const int64_t symbols = std::min(block, count - b * block);
    return ((starts[b] + (symbols - 1) * code.longest) >> 3) + 8;
  };
  int64_t in_place = 0;
  while (in_place < n_blocks && read_end(in_place) <= nbytes) ++in_place;
  const int64_t tail_from = in_place < n_blocks ? (starts[in_place] >> 3) : nbytes;
  std::vector<uint8_t> tail;
  if (in_place < n_blocks) {
    tail.assign(static_cast<size_t>(nbytes - tail_from + block * kMaxLength / 8 + 16), 0);
    std::memcpy(tail.data(), data + tail_from, static_cast<size_t>(nbytes - tail_from));
  }

  if (lengths.numel() <= 256) {
    decode_blocks<uint8_t>(code, build_multi(code), data, starts, in_place, tail_from, tail, count, block,
                           pack_bits, result);
  } else {
    decode_blocks<int32_t>(code, {}, data, starts, in_place, tail_from, tail, count, block, pack_bits,
                           result);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor> huffman_encode(const at::Tensor& symbols, const at::Tensor& lengths,
                                                  int64_t block) {
  TORCH_CHECK_VALUE(symbols.dim() == 1 && symbols.scalar_type() == at::kLong && symbols.device().is_cpu(),
                    "huffman_encode: symbols must be a CPU int64 [N] tensor");
  TORCH_CHECK_VALUE(block >= 1 && block <= (int64_t(1) << 20), "huffman_encode: block=", block);
  const Code code = build_code(lengths);
  const at::Tensor lengths_c = lengths.contiguous();
  const int64_t* length_of = lengths_c.data_ptr<int64_t>();
  const int64_t n_symbols = lengths_c.numel();
  const at::Tensor sym_c = symbols.contiguous();
  const int64_t* sym = sym_c.data_ptr<int64_t>();
  const int64_t n = sym_c.numel();
  const int64_t n_blocks = (n + block - 1) / block;

  at::Tensor block_bits = at::zeros({n_blocks}, at::kLong);
  int64_t* bits = block_bits.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t end = std::min(n, (b + 1) * block);
    int64_t sum = 0;
    for (int64_t i = b * block; i < end; ++i) {
      const int64_t s = sym[i];
      TORCH_CHECK_VALUE(s >= 0 && s < n_symbols && length_of[s] > 0, "huffman_encode: symbol ", s,
                        " at position ", i, " has no code (", n_symbols, " symbols)");
      sum += length_of[s];
    }
    bits[b] = sum;
    total += sum;
  }
  const int64_t nbytes = (total + 7) / 8;
  at::Tensor payload = at::empty({nbytes}, at::kByte);
  uint8_t* dst = payload.data_ptr<uint8_t>();
  const uint32_t* codes = code.codes.data();
  // A 64-bit accumulator: whole 32-bit words go out as soon as they are complete (never past nbytes).
  uint64_t acc = 0;
  int held = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = sym[i];
    const int l = static_cast<int>(length_of[s]);
    acc = (acc << l) | codes[s];
    held += l;
    if (held >= 32) {
      held -= 32;
      const uint32_t word = __builtin_bswap32(static_cast<uint32_t>(acc >> held));
      std::memcpy(dst, &word, 4);
      dst += 4;
    }
  }
  while (held > 0) {  // the last bits, zero-padded to a byte
    if (held >= 8) {
      held -= 8;
      *dst++ = static_cast<uint8_t>(acc >> held);
    } else {
      *dst++ = static_cast<uint8_t>(acc << (8 - held));
      held = 0;
    }
  }
  TORCH_CHECK(dst == payload.data_ptr<uint8_t>() + nbytes, "huffman_encode: wrote ",
              dst - payload.data_ptr<uint8_t>(), " bytes, expected ", nbytes);
  return {block_bits, payload};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idkm_plugin, m) {
  m.def("huffman_decode(Tensor payload, Tensor block_bits, Tensor lengths, int count, int block, int pack_bits) -> Tensor");
  m.def("huffman_encode(Tensor symbols, Tensor lengths, int block) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(idkm_plugin, CPU, m) {
  m.impl("huffman_decode", &huffman_decode);
  m.impl("huffman_encode", &huffman_encode);
}
