//! Data readers: MNIST's IDX files, CoNLL-U treebanks, gradient streams in `.npy`.

pub mod conllu;
pub mod mnist;
pub mod npy;
