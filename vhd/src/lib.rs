//! Disk image backends behind one async block interface, on io_uring.
#![deny(unsafe_code)]
