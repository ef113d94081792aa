# CMake toolchain for aarch64 Linux (Raspberry Pi 4 with a 64-bit OS), using Debian/Ubuntu's
# cross compiler (apt-get install g++-aarch64-linux-gnu). Run the result on x86 with
#   qemu-aarch64 -L /usr/aarch64-linux-gnu ./hago-runner ...   (apt-get install qemu-user)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(HAGO_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "cross compiler prefix")
set(CMAKE_C_COMPILER "${HAGO_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${HAGO_CROSS_PREFIX}g++")

set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Raspberry Pi 4: Cortex-A72 (ARMv8-A, NEON).
set(CMAKE_CXX_FLAGS_INIT "-mcpu=cortex-a72")
set(CMAKE_C_FLAGS_INIT "-mcpu=cortex-a72")
