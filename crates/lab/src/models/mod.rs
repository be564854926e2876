//! The benchmark models in burn: the MNIST autoencoder and the Transformer tagger, and the
//! elementwise kernels they share.

pub mod autoencoder;
pub mod fastmath;
pub mod tagger;
