// hago device runner: load a TVM-exported Relax model (.so), feed .npy inputs, run a function
// of the Relax VM, print outputs and latency statistics as JSON.
//
//   hago-runner MODEL.so [--inputs DIR | --input [NAME=]A.npy ...] [--out DIR]
//               [--repeat N] [--warmup K] [--threads T] [--func main]
//
// Inputs: --inputs DIR takes every "<index>[_anything].npy" file of DIR, in index order
// (0.npy, 1.npy, ...; e.g. 0_x.npy, 1_w.npy); --input FILE may be repeated instead (in order),
// or --input NAME=FILE to bind the function's parameters by name.
// .npy versions 1-3, little endian, C order; dtypes float16/32/64, (u)int8/16/32/64.
// Outputs: with --out DIR each output tensor i is written to DIR/out_<i>.npy and the JSON
// names the file; without --out the JSON holds the values (flattened, C order; NaN/Infinity
// as Python's json module reads them).
// Latency: `warmup` untimed calls, then `repeat` timed calls of the function; milliseconds.
// Threads: --threads T sets TVM_NUM_THREADS before the TVM runtime starts its thread pool.
//
// Built against tvm-ffi's C++ API only; links libtvm_runtime.so (Relax VM, executable loader)
// and libtvm_ffi.so. Runs on the CPU (kDLCPU, device 0).
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <limits.h>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------- dtypes
struct DTypeInfo {
  const char* descr;  // numpy descr without the byte-order char
  const char* name;   // numpy dtype name
  DLDataType dl;
};

const DTypeInfo kDTypes[] = {
    {"f2", "float16", {kDLFloat, 16, 1}}, {"f4", "float32", {kDLFloat, 32, 1}},
    {"f8", "float64", {kDLFloat, 64, 1}}, {"i1", "int8", {kDLInt, 8, 1}},
    {"u1", "uint8", {kDLUInt, 8, 1}},     {"i2", "int16", {kDLInt, 16, 1}},
    {"u2", "uint16", {kDLUInt, 16, 1}},   {"i4", "int32", {kDLInt, 32, 1}},
    {"u4", "uint32", {kDLUInt, 32, 1}},   {"i8", "int64", {kDLInt, 64, 1}},
    {"u8", "uint64", {kDLUInt, 64, 1}},
};

const DTypeInfo& FindDType(DLDataType t) {
  for (const auto& d : kDTypes) {
    if (d.dl.code == t.code && d.dl.bits == t.bits && d.dl.lanes == t.lanes) return d;
  }
  throw std::runtime_error("unsupported output dtype (code " + std::to_string(t.code) + ", bits " +
                           std::to_string(t.bits) + ", lanes " + std::to_string(t.lanes) + ")");
}

// 64-byte aligned CPU allocation (TVM kernels may assume aligned buffers).
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// ---------------------------------------------------------------- .npy
std::string HeaderValue(const std::string& header, const std::string& key, const std::string& file) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error(file + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(" ", colon + 1);
  char open = header[start];
  size_t end;
  if (open == '\'' || open == '"') {
    end = header.find(open, start + 1);
    return header.substr(start + 1, end - start - 1);
  }
  if (open == '(') {
    end = header.find(')', start);
    return header.substr(start + 1, end - start - 1);
  }
  end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

ffi::Tensor LoadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UsageError("cannot open input " + path);
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw UsageError(path + ": not a .npy file");
  }
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else if (magic[6] == 2 || magic[6] == 3) {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    throw UsageError(path + ": unsupported .npy version " + std::to_string(int(magic[6])));
  }
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) throw UsageError(path + ": truncated .npy header");

  std::string descr = HeaderValue(header, "descr", path);
  if (HeaderValue(header, "fortran_order", path) != "False") {
    throw UsageError(path + ": Fortran-order arrays are not supported (save a C-order array)");
  }
  std::vector<int64_t> shape;
  std::stringstream ss(HeaderValue(header, "shape", path));
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.find_first_not_of(" ") == std::string::npos) continue;
    shape.push_back(std::stoll(item));
  }
  if (descr.size() != 3 || (descr[0] == '>' && descr[2] != '1')) {
    throw UsageError(path + ": unsupported dtype '" + descr + "' (little-endian numeric only)");
  }
  const DTypeInfo* info = nullptr;
  for (const auto& d : kDTypes) {
    if (descr.substr(1) == d.descr) info = &d;
  }
  if (info == nullptr) throw UsageError(path + ": unsupported dtype '" + descr + "'");

  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), info->dl,
                                           DLDevice{kDLCPU, 0});
  size_t nbytes = ffi::GetDataSize(t.numel(), info->dl);
  if (nbytes > 0 && !f.read(static_cast<char*>(t.data_ptr()), nbytes)) {
    throw UsageError(path + ": truncated data (expected " + std::to_string(nbytes) + " bytes)");
  }
  return t;
}

std::string ShapeString(const ffi::Tensor& t, const char* open, const char* close, bool tuple) {
  std::string s = open;
  for (int i = 0; i < t.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.shape()[i]);
  }
  if (tuple && t.ndim() == 1) s += ",";
  return s + close;
}

void SaveNpy(const ffi::Tensor& t, const std::string& path) {
  const DTypeInfo& info = FindDType(t.dtype());
  std::string descr = std::string(t.dtype().bits == 8 ? "|" : "<") + info.descr;
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " +
                       ShapeString(t, "(", ")", true) + ", }";
  size_t total = 10 + header.size() + 1;  // magic(6) + version(2) + len(2) + header + '\n'
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  f.write("\x93NUMPY\x01\x00", 8);
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                          static_cast<unsigned char>(header.size() >> 8)};
  f.write(reinterpret_cast<char*>(len), 2);
  f.write(header.data(), header.size());
  f.write(static_cast<const char*>(t.data_ptr()), ffi::GetDataSize(t.numel(), t.dtype()));
  if (!f) throw std::runtime_error("error writing " + path);
}

// ---------------------------------------------------------------- JSON helpers
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string JsonDouble(double v, int digits) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
  return buf;
}

float HalfToFloat(uint16_t h) {
  int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float sign = (h & 0x8000) ? -1.0f : 1.0f;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -24);
  if (exp == 31) return mant ? NAN : sign * INFINITY;
  return sign * std::ldexp(static_cast<float>(mant | 0x400), exp - 25);
}

std::string JsonValues(const ffi::Tensor& t) {
  std::string s = "[";
  const char* p = static_cast<const char*>(t.data_ptr());
  DLDataType d = t.dtype();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (i) s += ", ";
    if (d.code == kDLFloat && d.bits == 32) {
      s += JsonDouble(reinterpret_cast<const float*>(p)[i], 9);
    } else if (d.code == kDLFloat && d.bits == 64) {
      s += JsonDouble(reinterpret_cast<const double*>(p)[i], 17);
    } else if (d.code == kDLFloat && d.bits == 16) {
      s += JsonDouble(HalfToFloat(reinterpret_cast<const uint16_t*>(p)[i]), 5);
    } else if (d.code == kDLInt) {
      int64_t v = d.bits == 8    ? reinterpret_cast<const int8_t*>(p)[i]
                  : d.bits == 16 ? reinterpret_cast<const int16_t*>(p)[i]
                  : d.bits == 32 ? reinterpret_cast<const int32_t*>(p)[i]
                                 : reinterpret_cast<const int64_t*>(p)[i];
      s += std::to_string(v);
    } else {
      uint64_t v = d.bits == 8    ? reinterpret_cast<const uint8_t*>(p)[i]
                   : d.bits == 16 ? reinterpret_cast<const uint16_t*>(p)[i]
                   : d.bits == 32 ? reinterpret_cast<const uint32_t*>(p)[i]
                                  : reinterpret_cast<const uint64_t*>(p)[i];
      s += std::to_string(v);
    }
  }
  return s + "]";
}

// Flatten a VM result (a tensor or nested tuples of tensors) into a list of tensors.
void CollectOutputs(const ffi::Any& result, std::vector<ffi::Tensor>* out) {
  if (auto t = result.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) CollectOutputs(item, out);
  } else {
    throw std::runtime_error("model output of type " + result.GetTypeKey() +
                             " is not a tensor or a tuple of tensors");
  }
}

// ---------------------------------------------------------------- input discovery
std::vector<std::string> InputsFromDir(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) throw UsageError("cannot open inputs directory " + dir);
  std::vector<std::pair<long, std::string>> found;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name.size() < 5 || name.substr(name.size() - 4) != ".npy") continue;
    size_t digits = name.find_first_not_of("0123456789");
    if (digits == 0) continue;
    if (name[digits] != '.' && name[digits] != '_') continue;
    found.emplace_back(std::stol(name.substr(0, digits)), dir + "/" + name);
  }
  closedir(d);
  std::sort(found.begin(), found.end());
  std::vector<std::string> files;
  for (size_t i = 0; i < found.size(); ++i) {
    if (found[i].first != static_cast<long>(i)) {
      throw UsageError(dir + ": input files must be numbered 0..n-1 without gaps or duplicates (" +
                       found[i].second + ")");
    }
    files.push_back(found[i].second);
  }
  return files;
}

struct Options {
  std::string model, inputs_dir, out_dir, func = "main";
  std::vector<std::string> inputs;
  int repeat = 10, warmup = 1, threads = 0;
};

int ParseInt(const std::string& flag, const std::string& v, int min) {
  try {
    size_t used = 0;
    int n = std::stoi(v, &used);
    if (used == v.size() && n >= min) return n;
  } catch (const std::exception&) {
  }
  throw UsageError(flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--inputs") o.inputs_dir = value();
    else if (a == "--input") o.inputs.push_back(value());
    else if (a == "--out") o.out_dir = value();
    else if (a == "--func") o.func = value();
    else if (a == "--repeat") o.repeat = ParseInt(a, value(), 1);
    else if (a == "--warmup") o.warmup = ParseInt(a, value(), 0);
    else if (a == "--threads") o.threads = ParseInt(a, value(), 1);
    else if (a == "-h" || a == "--help") throw UsageError("");
    else if (!a.empty() && a[0] == '-') throw UsageError("unknown option " + a);
    else if (o.model.empty()) o.model = a;
    else throw UsageError("unexpected argument " + a);
  }
  if (o.model.empty()) throw UsageError("no model given");
  if (!o.inputs_dir.empty() && !o.inputs.empty()) {
    throw UsageError("give either --inputs DIR or --input FILE, not both");
  }
  return o;
}

int Run(const Options& o) {
  if (o.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(o.threads).c_str(), 1);

  // Each input is "FILE" (positional) or "NAME=FILE" (bound to the parameter NAME).
  std::vector<std::string> specs = o.inputs_dir.empty() ? o.inputs : InputsFromDir(o.inputs_dir);
  std::vector<std::string> names, files;
  for (const auto& spec : specs) {
    size_t eq = o.inputs_dir.empty() ? spec.find('=') : std::string::npos;
    names.push_back(eq == std::string::npos ? "" : spec.substr(0, eq));
    files.push_back(eq == std::string::npos ? spec : spec.substr(eq + 1));
  }
  bool named = !names.empty() && !names[0].empty();
  for (const auto& n : names) {
    if (n.empty() == named) throw UsageError("give all inputs as NAME=FILE or none");
  }
  std::vector<ffi::Tensor> inputs;
  for (const auto& f : files) inputs.push_back(LoadNpy(f));

  // Load the exported library; its embedded Relax VM executable is deserialized by the loader
  // libtvm_runtime.so registers. Then create and initialize a VM like relax.VirtualMachine does.
  // dlopen searches the library path for names without a '/': use the absolute path.
  char* resolved = realpath(o.model.c_str(), nullptr);
  if (resolved == nullptr) throw UsageError("cannot open model " + o.model);
  std::string model_path = resolved;
  std::free(resolved);
  ffi::Module lib = ffi::Module::LoadFromFile(model_path);
  ffi::Optional<ffi::Function> load_exec = lib->GetFunction("vm_load_executable", true);
  if (!load_exec) throw std::runtime_error(o.model + " is not a Relax VM library (no vm_load_executable)");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  constexpr int kPooledAllocator = 2;
  vm->GetFunction("vm_initialization", false).value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  ffi::Optional<ffi::Function> maybe_func = vm->GetFunction(o.func, false);
  if (!maybe_func) throw std::runtime_error(o.model + " has no function '" + o.func + "'");
  ffi::Function func = maybe_func.value();

  if (named) {  // reorder the inputs to the function's parameter order
    int arity = vm->GetFunction("get_function_arity", false).value()(o.func).cast<int>();
    ffi::Function param_name = vm->GetFunction("get_function_param_name", false).value();
    std::vector<std::string> params;
    std::string listed;
    for (int i = 0; i < arity; ++i) {
      params.push_back(param_name(o.func, i).cast<ffi::String>());
      listed += (i ? ", " : "") + params.back();
    }
    for (const auto& n : names) {
      if (std::count(params.begin(), params.end(), n) == 0) {
        throw UsageError("input '" + n + "' is not a parameter of " + o.func + " (" + listed + ")");
      }
      if (std::count(names.begin(), names.end(), n) > 1) throw UsageError("input '" + n + "' given twice");
    }
    std::vector<ffi::Tensor> ordered;
    for (const auto& p : params) {
      auto it = std::find(names.begin(), names.end(), p);
      if (it == names.end()) throw UsageError("no input given for parameter '" + p + "' of " + o.func);
      ordered.push_back(inputs[it - names.begin()]);
    }
    inputs = ordered;
  }

  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  auto call = [&]() {
    ffi::Any result;
    func.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    return result;
  };

  ffi::Any result;
  for (int i = 0; i < o.warmup; ++i) result = call();
  std::vector<double> ms;
  for (int i = 0; i < o.repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    result = call();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }

  std::vector<ffi::Tensor> outputs;
  CollectOutputs(result, &outputs);

  std::string json = "{\"model\": " + JsonString(o.model) + ", \"func\": " + JsonString(o.func) +
                     ", \"num_inputs\": " + std::to_string(inputs.size()) + ", \"outputs\": [";
  for (size_t i = 0; i < outputs.size(); ++i) {
    const ffi::Tensor& t = outputs[i];
    if (t.device().device_type != kDLCPU || !t.IsContiguous()) {
      throw std::runtime_error("output " + std::to_string(i) + " is not a contiguous CPU tensor");
    }
    if (i) json += ", ";
    json += "{\"shape\": " + ShapeString(t, "[", "]", false) + ", \"dtype\": \"" +
            FindDType(t.dtype()).name + "\", ";
    if (!o.out_dir.empty()) {
      std::string path = o.out_dir + "/out_" + std::to_string(i) + ".npy";
      SaveNpy(t, path);
      json += "\"file\": " + JsonString(path) + "}";
    } else {
      json += "\"values\": " + JsonValues(t) + "}";
    }
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  double mean = 0;
  for (double v : ms) mean += v / n;
  json += "], \"latency_ms\": {\"median\": " + JsonDouble(median, 6) +
          ", \"mean\": " + JsonDouble(mean, 6) + ", \"min\": " + JsonDouble(sorted.front(), 6) +
          ", \"max\": " + JsonDouble(sorted.back(), 6) + ", \"n\": " + std::to_string(n) +
          ", \"warmup\": " + std::to_string(o.warmup) + ", \"times\": [";
  for (size_t i = 0; i < ms.size(); ++i) json += (i ? ", " : "") + JsonDouble(ms[i], 6);
  json += "]}, \"threads\": " +
          std::to_string(o.threads) + "}";
  std::cout << json << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = ParseArgs(argc, argv);
  } catch (const UsageError& e) {
    if (e.what()[0]) std::cerr << "hago-runner: " << e.what() << "\n";
    std::cerr << "usage: hago-runner MODEL.so [--inputs DIR | --input [NAME=]FILE.npy ...] [--out DIR]\n"
                 "                   [--repeat N] [--warmup K] [--threads T] [--func main]\n";
    return 2;
  }
  try {
    return Run(options);
  } catch (const UsageError& e) {  // bad inputs
    std::cerr << "hago-runner: " << e.what() << "\n";
    return 2;
  } catch (const ffi::Error& e) {
    std::cerr << "hago-runner: " << e.kind() << ": " << e.message() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "hago-runner: " << e.what() << "\n";
    return 1;
  }
}
