//! CoNLL-U reader and vocabularies for the Transformer part-of-speech tagger.
//!
//! [`read`] and [`parse`] turn a CoNLL-U file (<https://universaldependencies.org/format.html>)
//! into [`Sentence`]s, keeping the word forms and both tag columns; [`Vocab::words`] and
//! [`Vocab::tags`] build vocabularies from the training sentences; [`encode`] maps sentences to
//! id sequences that start with [`ROOT`].
//!
//! The reader is strict: every malformed line is a [`ConlluError::Malformed`] naming the file,
//! the 1-based line number and what is wrong, rather than being skipped.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::iter;
use std::path::{Path, PathBuf};

/// Id of the padding token and tag.
pub const PAD: u32 = 0;
/// Id of an unknown word (or a tag unseen in training).
pub const UNK: u32 = 1;
/// Id of the ROOT token prefixed to every sentence (and of its tag).
pub const ROOT: u32 = 2;

/// Names of the reserved ids [`PAD`], [`UNK`] and [`ROOT`], in id order.
const RESERVED_NAMES: [&str; 3] = ["<pad>", "<unk>", "<root>"];

/// The ten CoNLL-U columns, in file order.
const COLUMN_NAMES: [&str; 10] = [
    "ID", "FORM", "LEMMA", "UPOS", "XPOS", "FEATS", "HEAD", "DEPREL", "DEPS", "MISC",
];

/// Index of the FORM column.
const FORM_COLUMN: usize = 1;
/// Index of the UPOS column.
const UPOS_COLUMN: usize = 3;
/// Index of the XPOS column.
const XPOS_COLUMN: usize = 4;

/// The value CoNLL-U writes for an unspecified field.
const UNSPECIFIED: &str = "_";

/// Which column is the target.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TagColumn {
    /// Universal part-of-speech tags (column 4, UPOS).
    Upos,
    /// Language-specific part-of-speech tags (column 5, XPOS).
    Xpos,
}

impl fmt::Display for TagColumn {
    /// The CoNLL-U column name: `UPOS` or `XPOS`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            TagColumn::Upos => "UPOS",
            TagColumn::Xpos => "XPOS",
        })
    }
}

/// One sentence: its word forms and both tag columns (multiword-token lines `1-2` and empty
/// nodes `1.1` skipped).
///
/// The three vectors have the same length, one entry per word; an unspecified tag is `_`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sentence {
    /// The FORM column of each word.
    pub forms: Vec<String>,
    /// The UPOS column of each word.
    pub upos: Vec<String>,
    /// The XPOS column of each word.
    pub xpos: Vec<String>,
}

impl Sentence {
    /// The tags of `column`, one per word.
    pub fn tags(&self, column: TagColumn) -> &[String] {
        match column {
            TagColumn::Upos => &self.upos,
            TagColumn::Xpos => &self.xpos,
        }
    }
}

/// What can go wrong reading a CoNLL-U file.
#[derive(Debug, thiserror::Error)]
pub enum ConlluError {
    /// The file could not be read.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line breaks the CoNLL-U format (or, from [`read`], is not valid UTF-8).
    #[error("{path}:{line}: {msg}", path = path.display())]
    Malformed {
        /// The file (as given to [`parse`] or [`read`]).
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The file holds no sentence (it is empty or has only comments and blank lines).
    #[error("{path}: no sentence in the file", path = path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Every tag of the requested column is `_`, so the column cannot be a training target.
    /// Not returned by this module: callers build it after [`has_tags`] returns false.
    #[error("{path}: every {column} tag is `_`; the column cannot be a target", path = path.display())]
    NoTags {
        /// The file.
        path: PathBuf,
        /// The column without tags.
        column: TagColumn,
    },
}

/// Builds a [`ConlluError::Malformed`].
fn malformed(path: &Path, line: usize, msg: impl Into<String>) -> ConlluError {
    ConlluError::Malformed {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// What the ID field of a token line says the line is.
enum TokenId {
    /// A word with this 1-based index in its sentence.
    Word(usize),
    /// A multiword token `a-b` (skipped: its words follow on their own lines).
    MultiwordToken,
    /// An empty node `a.b` (skipped: it is not a word of the surface sentence).
    EmptyNode,
}

/// Parses a canonical non-negative decimal integer: ASCII digits without a leading zero
/// (except `0` itself).
fn parse_integer(text: &str) -> Option<usize> {
    let canonical = !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical {
        text.parse().ok()
    } else {
        None
    }
}

/// Classifies an ID field: a word `n` (n ≥ 1), a multiword token `a-b` (1 ≤ a < b) or an
/// empty node `a.b` (a ≥ 0, b ≥ 1); `None` for anything else.
fn classify_id(id: &str) -> Option<TokenId> {
    if let Some((first, last)) = id.split_once('-') {
        let (first, last) = (parse_integer(first)?, parse_integer(last)?);
        (1 <= first && first < last).then_some(TokenId::MultiwordToken)
    } else if let Some((word, node)) = id.split_once('.') {
        let (_word, node) = (parse_integer(word)?, parse_integer(node)?);
        (node >= 1).then_some(TokenId::EmptyNode)
    } else {
        let word = parse_integer(id)?;
        (word >= 1).then_some(TokenId::Word(word))
    }
}

/// The sentence being read: the words so far and where its first token line was.
#[derive(Default)]
struct SentenceBuilder {
    /// Words read so far.
    forms: Vec<String>,
    /// UPOS of the words read so far.
    upos: Vec<String>,
    /// XPOS of the words read so far.
    xpos: Vec<String>,
    /// Line number of the first token line (word, multiword token or empty node), if any.
    first_token_line: Option<usize>,
}

impl SentenceBuilder {
    /// Checks and adds one token line (not blank, not a comment).
    fn push_line(
        &mut self,
        line: &str,
        line_number: usize,
        path: &Path,
    ) -> Result<(), ConlluError> {
        self.first_token_line.get_or_insert(line_number);
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != COLUMN_NAMES.len() {
            return Err(malformed(
                path,
                line_number,
                format!(
                    "expected {} tab-separated fields, found {}",
                    COLUMN_NAMES.len(),
                    fields.len()
                ),
            ));
        }
        if let Some((column, _)) = COLUMN_NAMES
            .iter()
            .zip(&fields)
            .find(|(_, value)| value.is_empty())
        {
            return Err(malformed(
                path,
                line_number,
                format!("empty {column} field (CoNLL-U writes `_` for an unspecified value)"),
            ));
        }
        let id = fields[0];
        match classify_id(id) {
            None => Err(malformed(
                path,
                line_number,
                format!(
                    "invalid ID `{id}`: expected a word index n ≥ 1, \
                     a multiword range `a-b` or an empty node `a.b`"
                ),
            )),
            Some(TokenId::MultiwordToken | TokenId::EmptyNode) => Ok(()),
            Some(TokenId::Word(found)) => {
                let expected = self.forms.len() + 1;
                if found != expected {
                    return Err(malformed(
                        path,
                        line_number,
                        format!(
                            "word ID {found} is out of sequence: expected {expected} \
                             (word IDs count from 1 in each sentence)"
                        ),
                    ));
                }
                self.forms.push(fields[FORM_COLUMN].to_owned());
                self.upos.push(fields[UPOS_COLUMN].to_owned());
                self.xpos.push(fields[XPOS_COLUMN].to_owned());
                Ok(())
            }
        }
    }

    /// Ends the sentence at a blank line or the end of the text: appends it to `sentences` if
    /// it has words and resets the builder. A block of comments only yields nothing; a block of
    /// token lines without any word is malformed.
    fn finish(&mut self, sentences: &mut Vec<Sentence>, path: &Path) -> Result<(), ConlluError> {
        let builder = std::mem::take(self);
        match builder.first_token_line {
            None => Ok(()),
            Some(line) if builder.forms.is_empty() => Err(malformed(
                path,
                line,
                "sentence has no word line (only multiword tokens or empty nodes)",
            )),
            Some(_) => {
                sentences.push(Sentence {
                    forms: builder.forms,
                    upos: builder.upos,
                    xpos: builder.xpos,
                });
                Ok(())
            }
        }
    }
}

/// Parse CoNLL-U text; `path` is only used in error messages; lines numbered from 1.
///
/// A leading UTF-8 byte order mark is ignored, and so is a `\r` ending a line. Lines starting
/// with `#` are comments. A line that is empty (after removing `\r`) ends a sentence; a line of
/// only spaces or tabs is malformed. Any other line must have exactly 10 tab-separated, non-empty
/// fields, with an ID that is a word index (consecutive from 1 in each sentence), a multiword
/// range `a-b` or an empty node `a.b`; the latter two are skipped. The text need not end with a
/// blank line.
///
/// # Errors
///
/// [`ConlluError::Malformed`] for the first line breaking these rules;
/// [`ConlluError::Empty`] when the text holds no sentence.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Sentence>, ConlluError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sentences = Vec::new();
    let mut sentence = SentenceBuilder::default();
    for (index, raw_line) in text.split('\n').enumerate() {
        let line_number = index + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        if line.is_empty() {
            sentence.finish(&mut sentences, path)?;
        } else if line.starts_with('#') {
            continue;
        } else if line.trim().is_empty() {
            return Err(malformed(
                path,
                line_number,
                "line holds only whitespace (a line ending a sentence must be empty)",
            ));
        } else {
            sentence.push_line(line, line_number, path)?;
        }
    }
    sentence.finish(&mut sentences, path)?;
    if sentences.is_empty() {
        return Err(ConlluError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(sentences)
}

/// Read and parse a file (see [`parse`] for the format rules).
///
/// # Errors
///
/// [`ConlluError::Io`] when the file cannot be read. Bytes that are not valid UTF-8 are a
/// [`ConlluError::Malformed`] naming the line (1-based) and the byte position of the first
/// invalid byte. Otherwise as [`parse`].
pub fn read(path: &Path) -> Result<Vec<Sentence>, ConlluError> {
    let bytes = std::fs::read(path).map_err(|source| ConlluError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bytes(&bytes, path)
}

/// [`read`] without the file system: a file's bytes, `path` naming it in errors (what
/// `fuzz/fuzz_targets/conllu.rs` runs).
pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Vec<Sentence>, ConlluError> {
    let text = std::str::from_utf8(bytes).map_err(|error| {
        let valid = &bytes[..error.valid_up_to()];
        let line_start = valid
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |newline| newline + 1);
        let line = valid.iter().filter(|&&byte| byte == b'\n').count() + 1;
        malformed(
            path,
            line,
            format!(
                "invalid UTF-8 at byte {} of the line (byte {} of the file, counting from 1)",
                valid.len() - line_start + 1,
                valid.len() + 1
            ),
        )
    })?;
    parse(text, path)
}

/// True when some tag of `column` is not `_`.
pub fn has_tags(sentences: &[Sentence], column: TagColumn) -> bool {
    sentences
        .iter()
        .flat_map(|sentence| sentence.tags(column))
        .any(|tag| tag != UNSPECIFIED)
}

/// A vocabulary: ids 0,1,2 are reserved ("<pad>", "<unk>", "<root>"), then the entries.
///
/// The reserved names are not looked up by [`Vocab::id`]: a word spelled `<pad>` in the data
/// is an ordinary entry with its own id.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// Name of each id: the reserved names, then the entries.
    names: Vec<String>,
    /// Id of each entry (reserved names excluded).
    ids: HashMap<String, u32>,
}

impl Vocab {
    /// A vocabulary of the reserved ids followed by `entries`, in order (which must be
    /// distinct). Entries beyond id `u32::MAX` are dropped (unreachable in practice).
    fn from_entries<'a>(entries: impl IntoIterator<Item = &'a str>) -> Vocab {
        let mut names: Vec<String> = RESERVED_NAMES.iter().map(|&name| name.to_owned()).collect();
        let mut ids = HashMap::new();
        for (id, entry) in (ROOT + 1..=u32::MAX).zip(entries) {
            names.push(entry.to_owned());
            ids.insert(entry.to_owned(), id);
        }
        Vocab { names, ids }
    }

    /// Words of the training sentences occurring at least `min_count` times (min_count 0
    /// treated as 1), ordered by count descending then by string (deterministic).
    ///
    /// Forms are taken as written (no case folding).
    pub fn words(sentences: &[Sentence], min_count: usize) -> Vocab {
        let min_count = min_count.max(1);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for form in sentences.iter().flat_map(|sentence| &sentence.forms) {
            *counts.entry(form).or_default() += 1;
        }
        let mut frequent: Vec<(&str, usize)> = counts
            .into_iter()
            .filter(|&(_, count)| count >= min_count)
            .collect();
        frequent.sort_by(|(word_a, count_a), (word_b, count_b)| {
            count_b.cmp(count_a).then_with(|| word_a.cmp(word_b))
        });
        Vocab::from_entries(frequent.into_iter().map(|(word, _)| word))
    }

    /// All tag values of `column` in the training sentences, sorted by string.
    ///
    /// `_` counts as a value like any other (check [`has_tags`] first).
    pub fn tags(sentences: &[Sentence], column: TagColumn) -> Vocab {
        let values: BTreeSet<&str> = sentences
            .iter()
            .flat_map(|sentence| sentence.tags(column))
            .map(String::as_str)
            .collect();
        Vocab::from_entries(values)
    }

    /// Number of ids, including the 3 reserved ones.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Id of `s`, or [`UNK`] when it is not an entry.
    pub fn id(&self, s: &str) -> u32 {
        self.ids.get(s).copied().unwrap_or(UNK)
    }

    /// Name of `id` (`<pad>`, `<unk>`, `<root>` for the reserved ids), or `None` when out of
    /// range.
    pub fn name(&self, id: u32) -> Option<&str> {
        let index = usize::try_from(id).ok()?;
        self.names.get(index).map(String::as_str)
    }
}

/// A sentence as ids, ROOT first: tokens[0] = ROOT, tags[0] = ROOT, then one id per word (UNK
/// for unknown words/tags).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// [`ROOT`], then the word ids.
    pub tokens: Vec<u32>,
    /// [`ROOT`], then the tag ids (same length as `tokens`).
    pub tags: Vec<u32>,
}

/// Encodes each sentence with the `words` vocabulary and the `tags` vocabulary of `column`.
pub fn encode(
    sentences: &[Sentence],
    words: &Vocab,
    tags: &Vocab,
    column: TagColumn,
) -> Vec<Encoded> {
    sentences
        .iter()
        .map(|sentence| Encoded {
            tokens: iter::once(ROOT)
                .chain(sentence.forms.iter().map(|form| words.id(form)))
                .collect(),
            tags: iter::once(ROOT)
                .chain(sentence.tags(column).iter().map(|tag| tags.id(tag)))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Path used in error messages of the tests.
    const FIXTURE_PATH: &str = "file.conllu";

    /// Two sentences with a BOM, CRLF line endings, comments, a comment-only block, a
    /// multiword token, an empty node and no final blank line.
    const FIXTURE: &str = "\u{feff}# sent_id = 1\r\n\
        # text = del campo\r\n\
        1-2\tdel\t_\t_\t_\t_\t_\t_\t_\t_\r\n\
        1\tde\tde\tADP\tSP\t_\t3\tcase\t_\t_\r\n\
        2\tel\tel\tDET\tDA\t_\t3\tdet\t_\t_\r\n\
        2.1\tvisto\tver\tVERB\tV\t_\t_\t_\t0:root\t_\r\n\
        3\tcampo\tcampo\tNOUN\tNC\t_\t0\troot\t_\t_\r\n\
        \r\n\
        # a block of comments only\r\n\
        \r\n\
        \r\n\
        # sent_id = 2\r\n\
        1\tYa\tya\tADV\t_\t_\t0\troot\t_\t_\r\n\
        2\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_";

    /// The real training file of the Ancient Greek PTNK treebank.
    const PTNK_TRAIN: &str = "/work/shared/data/ud/ptnk/grc_ptnk-ud-train.conllu";

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|&value| value.to_owned()).collect()
    }

    fn sentence(forms: &[&str], upos: &[&str], xpos: &[&str]) -> Sentence {
        Sentence {
            forms: strings(forms),
            upos: strings(upos),
            xpos: strings(xpos),
        }
    }

    /// A word line with ID `id`, FORM `form`, UPOS `NOUN` and XPOS `_`.
    fn word_line(id: &str, form: &str) -> String {
        format!("{id}\t{form}\t{form}\tNOUN\t_\t_\t0\troot\t_\t_\n")
    }

    /// Parses `text`, expecting a `Malformed` error; returns its line, message and Display.
    fn malformed_error(text: &str) -> (usize, String, String) {
        match parse(text, Path::new(FIXTURE_PATH)) {
            Err(error @ ConlluError::Malformed { .. }) => {
                let display = error.to_string();
                let ConlluError::Malformed { line, msg, .. } = error else {
                    unreachable!("matched Malformed above");
                };
                (line, msg, display)
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// Asserts `text` is malformed at `line` with a message containing every key word.
    fn assert_malformed(text: &str, line: usize, key_words: &[&str]) {
        let (found_line, msg, display) = malformed_error(text);
        assert_eq!(found_line, line, "line of error `{msg}`");
        assert!(
            display.starts_with(&format!("{FIXTURE_PATH}:{line}: ")),
            "display `{display}`"
        );
        for key_word in key_words {
            assert!(msg.contains(key_word), "`{msg}` lacks `{key_word}`");
        }
    }

    #[test]
    fn parses_fixture_with_comments_multiword_tokens_empty_nodes_and_crlf() {
        let sentences = parse(FIXTURE, Path::new(FIXTURE_PATH)).expect("fixture parses");
        assert_eq!(
            sentences,
            vec![
                sentence(
                    &["de", "el", "campo"],
                    &["ADP", "DET", "NOUN"],
                    &["SP", "DA", "NC"]
                ),
                sentence(&["Ya", "."], &["ADV", "PUNCT"], &["_", "_"]),
            ]
        );
        assert_eq!(sentences[0].tags(TagColumn::Upos), ["ADP", "DET", "NOUN"]);
        assert_eq!(sentences[0].tags(TagColumn::Xpos), ["SP", "DA", "NC"]);
    }

    #[test]
    fn final_blank_lines_and_lf_endings_give_the_same_sentences() {
        let lf = FIXTURE.replace("\r\n", "\n");
        let with_final_blank = format!("{lf}\n\n");
        let expected = parse(FIXTURE, Path::new(FIXTURE_PATH)).expect("fixture parses");
        assert_eq!(parse(&lf, Path::new(FIXTURE_PATH)).expect("LF"), expected);
        assert_eq!(
            parse(&with_final_blank, Path::new(FIXTURE_PATH)).expect("final blank"),
            expected
        );
    }

    #[test]
    fn wrong_field_count_is_malformed() {
        let text = format!("{}1\tde\tde\n", "# comment\n");
        assert_malformed(&text, 2, &["expected 10", "found 3"]);
        let eleven = "1\ta\ta\tNOUN\t_\t_\t0\troot\t_\t_\textra\n";
        assert_malformed(eleven, 1, &["found 11"]);
        // Space-separated fields are one field.
        assert_malformed("1 a a NOUN _ _ 0 root _ _\n", 1, &["found 1"]);
    }

    #[test]
    fn invalid_ids_are_malformed() {
        for id in [
            "x", "0", "01", "-1", "1-", "2-1", "1-1", "1.", ".1", "1.0", "1.2.3", "+1",
        ] {
            let text = format!("{}{}", word_line("1", "a"), word_line(id, "b"));
            assert_malformed(&text, 2, &["invalid ID", &format!("`{id}`")]);
        }
    }

    #[test]
    fn word_ids_must_count_from_one_in_each_sentence() {
        let skipped = format!("{}{}", word_line("1", "a"), word_line("3", "b"));
        assert_malformed(&skipped, 2, &["word ID 3", "expected 2"]);
        let not_from_one = word_line("2", "a");
        assert_malformed(&not_from_one, 1, &["word ID 2", "expected 1"]);
        let continued = format!("{}\n{}", word_line("1", "a"), word_line("2", "b"));
        assert_malformed(&continued, 3, &["word ID 2", "expected 1"]);
        let repeated = format!("{}{}", word_line("1", "a"), word_line("1", "b"));
        assert_malformed(&repeated, 2, &["word ID 1", "expected 2"]);
    }

    #[test]
    fn empty_fields_are_malformed() {
        assert_malformed(
            "1\t\ta\tNOUN\t_\t_\t0\troot\t_\t_\n",
            1,
            &["empty FORM field"],
        );
        assert_malformed(
            "# c\n1\ta\ta\t\t_\t_\t0\troot\t_\t_\n",
            2,
            &["empty UPOS field"],
        );
        let text = format!("{}2\tb\tb\tNOUN\t\t_\t1\tdep\t_\t_\n", word_line("1", "a"));
        assert_malformed(&text, 2, &["empty XPOS field"]);
    }

    #[test]
    fn whitespace_only_line_is_malformed() {
        let text = format!("{} \r\n{}", word_line("1", "a"), word_line("1", "b"));
        assert_malformed(&text, 2, &["only whitespace"]);
    }

    #[test]
    fn sentence_without_words_is_malformed() {
        let text = format!(
            "{}\n# c\n1-2\tab\t_\t_\t_\t_\t_\t_\t_\t_\n",
            word_line("1", "a")
        );
        assert_malformed(&text, 4, &["no word line"]);
    }

    #[test]
    fn text_without_sentences_is_empty() {
        for text in [
            "",
            "\u{feff}",
            "\n\n",
            "# only a comment\r\n\r\n# and another\n",
        ] {
            match parse(text, Path::new(FIXTURE_PATH)) {
                Err(error @ ConlluError::Empty { .. }) => {
                    assert_eq!(error.to_string(), "file.conllu: no sentence in the file");
                }
                other => panic!("expected Empty for {text:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn read_reports_invalid_utf8_with_its_line_and_missing_files_as_io() {
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        let mut bytes = word_line("1", "a").into_bytes();
        bytes.extend_from_slice(b"2\tb\xff\tb\tNOUN\t_\t_\t1\tdep\t_\t_\n");
        file.write_all(&bytes).expect("write temporary file");
        match read(file.path()) {
            Err(ConlluError::Malformed { line, msg, .. }) => {
                assert_eq!(line, 2);
                assert!(msg.contains("invalid UTF-8"), "{msg}");
                assert!(msg.contains("byte 4 of the line"), "{msg}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }

        let missing = file.path().with_extension("missing");
        match read(&missing) {
            Err(error @ ConlluError::Io { .. }) => {
                assert!(error
                    .to_string()
                    .starts_with(&format!("{}: ", missing.display())));
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn read_parses_a_valid_file() {
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        file.write_all(FIXTURE.as_bytes()).expect("write");
        let expected = parse(FIXTURE, Path::new(FIXTURE_PATH)).expect("fixture parses");
        assert_eq!(read(file.path()).expect("read"), expected);
    }

    #[test]
    fn word_vocab_orders_by_count_then_string_and_applies_min_count() {
        let sentences = [
            sentence(&["b", "a", "b"], &["X"; 3], &["_"; 3]),
            sentence(&["d", "a", "b", "c"], &["X"; 4], &["_"; 4]),
        ];
        let words = Vocab::words(&sentences, 1);
        assert_eq!(words.len(), 7);
        let names: Vec<&str> = (0..7).filter_map(|id| words.name(id)).collect();
        assert_eq!(names, ["<pad>", "<unk>", "<root>", "b", "a", "c", "d"]);
        assert_eq!(
            [words.id("b"), words.id("a"), words.id("c"), words.id("d")],
            [3, 4, 5, 6]
        );
        assert_eq!(words.id("e"), UNK);
        assert_eq!(words.id("<pad>"), UNK);
        assert_eq!(words.name(7), None);
        assert_eq!(words.name(u32::MAX), None);

        assert_eq!(Vocab::words(&sentences, 0), words);

        let frequent = Vocab::words(&sentences, 2);
        assert_eq!(frequent.len(), 5);
        assert_eq!([frequent.id("b"), frequent.id("a")], [3, 4]);
        assert_eq!([frequent.id("c"), frequent.id("d")], [UNK, UNK]);

        assert_eq!(Vocab::words(&sentences, 4).len(), 3);
        assert_eq!(Vocab::words(&[], 1).len(), 3);
    }

    #[test]
    fn tag_vocab_is_sorted_by_string() {
        let sentences = [
            sentence(&["a", "b"], &["VERB", "ADJ"], &["v", "_"]),
            sentence(&["c"], &["NOUN"], &["a"]),
        ];
        let upos = Vocab::tags(&sentences, TagColumn::Upos);
        let names: Vec<&str> = (0..6).filter_map(|id| upos.name(id)).collect();
        assert_eq!(names, ["<pad>", "<unk>", "<root>", "ADJ", "NOUN", "VERB"]);
        let xpos = Vocab::tags(&sentences, TagColumn::Xpos);
        assert_eq!([xpos.id("_"), xpos.id("a"), xpos.id("v")], [3, 4, 5]);
    }

    #[test]
    fn encode_puts_root_first_and_maps_unknowns_to_unk() {
        let training = [sentence(&["a", "b", "a"], &["X", "Y", "X"], &["_"; 3])];
        let words = Vocab::words(&training, 1);
        let tags = Vocab::tags(&training, TagColumn::Upos);
        let sentences = [
            sentence(&["b", "z", "a"], &["Y", "Q", "X"], &["_"; 3]),
            sentence(&["a"], &["X"], &["_"]),
        ];
        let encoded = encode(&sentences, &words, &tags, TagColumn::Upos);
        assert_eq!(
            encoded,
            [
                Encoded {
                    tokens: vec![ROOT, 4, UNK, 3],
                    tags: vec![ROOT, 4, UNK, 3],
                },
                Encoded {
                    tokens: vec![ROOT, 3],
                    tags: vec![ROOT, 3],
                },
            ]
        );
        assert!(encode(&[], &words, &tags, TagColumn::Upos).is_empty());
    }

    #[test]
    fn has_tags_is_false_when_every_tag_is_unspecified() {
        let sentences = [
            sentence(&["a", "b"], &["NOUN", "_"], &["_", "_"]),
            sentence(&["c"], &["_"], &["_"]),
        ];
        assert!(has_tags(&sentences, TagColumn::Upos));
        assert!(!has_tags(&sentences, TagColumn::Xpos));
        assert!(!has_tags(&[], TagColumn::Upos));
    }

    #[test]
    fn no_tags_error_names_file_and_column() {
        let error = ConlluError::NoTags {
            path: PathBuf::from(FIXTURE_PATH),
            column: TagColumn::Xpos,
        };
        assert_eq!(
            error.to_string(),
            "file.conllu: every XPOS tag is `_`; the column cannot be a target"
        );
    }

    #[test]
    fn reads_the_ptnk_training_file() {
        let path = Path::new(PTNK_TRAIN);
        if !path.exists() {
            eprintln!("skipped: {PTNK_TRAIN} is missing");
            return;
        }
        let sentences = read(path).expect("training file parses");
        assert_eq!(sentences.len(), 727);
        let words: usize = sentences.iter().map(|sentence| sentence.forms.len()).sum();
        assert_eq!(words, 18_440);
        for sentence in &sentences {
            assert_eq!(sentence.upos.len(), sentence.forms.len());
            assert_eq!(sentence.xpos.len(), sentence.forms.len());
        }
        let upos = Vocab::tags(&sentences, TagColumn::Upos);
        assert_eq!(upos.len(), 3 + 15);
        assert!(has_tags(&sentences, TagColumn::Upos));
        assert!(!has_tags(&sentences, TagColumn::Xpos));
    }
}
