# All of tinygpt's user C modules (one today). Point USER_C_MODULES here for CMake ports.
include(${CMAKE_CURRENT_LIST_DIR}/tinygpt/micropython.cmake)
