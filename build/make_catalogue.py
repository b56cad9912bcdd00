"""Rebuild the bundled book catalogue (pkg/tabgpt/data/gitenberg_catalogue.json).

    python build/make_catalogue.py GITenberg_repo_list.tsv

The books: a hand-picked list of popular Project Gutenberg titles (PICKS below: the most downloaded
books and the classics of each genre, English editions), each checked against the list of GITenberg
repositories (gitenberg-dev/gitberg, gitenberg/data/GITenberg_repo_list.tsv: "<id>\t<Title-Words>_<id>"),
which gives the repository name of every book. Raw files are read from
https://raw.githubusercontent.com/GITenberg/<repo>/master/<file> (a host that allows CORS); file names
vary across repositories, so the catalogue lists candidate names, best first:
<id>-0.txt (UTF-8), <id>.txt (ASCII), <id>-8.txt (Latin-1), then the HTML edition <id>-h/<id>-h.htm.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "pkg" / "tabgpt" / "data" / "gitenberg_catalogue.json"

# id | title | author, most popular first (search results keep this order).
PICKS = """
1342|Pride and Prejudice|Jane Austen
84|Frankenstein; Or, The Modern Prometheus|Mary Wollstonecraft Shelley
11|Alice's Adventures in Wonderland|Lewis Carroll
1661|The Adventures of Sherlock Holmes|Arthur Conan Doyle
2701|Moby-Dick; or, The Whale|Herman Melville
98|A Tale of Two Cities|Charles Dickens
1952|The Yellow Wallpaper|Charlotte Perkins Gilman
74|The Adventures of Tom Sawyer|Mark Twain
76|Adventures of Huckleberry Finn|Mark Twain
1080|A Modest Proposal|Jonathan Swift
345|Dracula|Bram Stoker
174|The Picture of Dorian Gray|Oscar Wilde
2542|A Doll's House|Henrik Ibsen
5200|Metamorphosis|Franz Kafka
1232|The Prince|Niccolo Machiavelli
844|The Importance of Being Earnest|Oscar Wilde
2600|War and Peace|Leo Tolstoy
1400|Great Expectations|Charles Dickens
46|A Christmas Carol|Charles Dickens
43|The Strange Case of Dr. Jekyll and Mr. Hyde|Robert Louis Stevenson
4300|Ulysses|James Joyce
1260|Jane Eyre|Charlotte Bronte
768|Wuthering Heights|Emily Bronte
64317|The Great Gatsby|F. Scott Fitzgerald
100|The Complete Works of William Shakespeare|William Shakespeare
1513|Romeo and Juliet|William Shakespeare
1524|Hamlet, Prince of Denmark|William Shakespeare
1533|Macbeth|William Shakespeare
2554|Crime and Punishment|Fyodor Dostoyevsky
28054|The Brothers Karamazov|Fyodor Dostoyevsky
1399|Anna Karenina|Leo Tolstoy
996|Don Quixote|Miguel de Cervantes
135|Les Miserables|Victor Hugo
1184|The Count of Monte Cristo|Alexandre Dumas
1257|The Three Musketeers|Alexandre Dumas
2413|Madame Bovary|Gustave Flaubert
16|Peter Pan|J. M. Barrie
120|Treasure Island|Robert Louis Stevenson
35|The Time Machine|H. G. Wells
36|The War of the Worlds|H. G. Wells
5230|The Invisible Man|H. G. Wells
159|The Island of Doctor Moreau|H. G. Wells
158|Emma|Jane Austen
161|Sense and Sensibility|Jane Austen
105|Persuasion|Jane Austen
141|Mansfield Park|Jane Austen
121|Northanger Abbey|Jane Austen
946|Lady Susan|Jane Austen
1250|Anthem|Ayn Rand
2638|The Idiot|Fyodor Dostoyevsky
600|Notes from the Underground|Fyodor Dostoyevsky
8117|The Possessed (The Devils)|Fyodor Dostoyevsky
2197|The Gambler|Fyodor Dostoyevsky
36034|White Nights and Other Stories|Fyodor Dostoyevsky
2610|Notre-Dame de Paris|Victor Hugo
164|Twenty Thousand Leagues under the Sea|Jules Verne
103|Around the World in Eighty Days|Jules Verne
18857|A Journey to the Centre of the Earth|Jules Verne
83|From the Earth to the Moon; and, Round the Moon|Jules Verne
1268|The Mysterious Island|Jules Verne
3526|Five Weeks in a Balloon|Jules Verne
219|Heart of Darkness|Joseph Conrad
974|The Secret Agent|Joseph Conrad
5658|Lord Jim|Joseph Conrad
2021|Nostromo: A Tale of the Seaboard|Joseph Conrad
2814|Dubliners|James Joyce
4217|A Portrait of the Artist as a Young Man|James Joyce
205|Walden, and On the Duty of Civil Disobedience|Henry David Thoreau
71|On the Duty of Civil Disobedience|Henry David Thoreau
1022|Walking|Henry David Thoreau
1497|The Republic|Plato
1656|Apology|Plato
1998|Thus Spake Zarathustra|Friedrich Nietzsche
4363|Beyond Good and Evil|Friedrich Nietzsche
52319|The Genealogy of Morals|Friedrich Nietzsche
19322|The Antichrist|Friedrich Nietzsche
51356|The Birth of Tragedy|Friedrich Nietzsche
3600|Essays of Michel de Montaigne|Michel de Montaigne
2680|Meditations|Marcus Aurelius
132|The Art of War|Sun Tzu
3207|Leviathan|Thomas Hobbes
7370|Second Treatise of Government|John Locke
10615|An Essay Concerning Humane Understanding, Volume 1|John Locke
34901|On Liberty|John Stuart Mill
3300|An Inquiry into the Nature and Causes of the Wealth of Nations|Adam Smith
61|The Communist Manifesto|Karl Marx and Friedrich Engels
1228|On the Origin of Species|Charles Darwin
944|The Voyage of the Beagle|Charles Darwin
2300|The Descent of Man|Charles Darwin
5740|Tractatus Logico-Philosophicus|Ludwig Wittgenstein
4280|The Critique of Pure Reason|Immanuel Kant
5683|The Critique of Practical Reason|Immanuel Kant
59|Discourse on the Method|Rene Descartes
4705|A Treatise of Human Nature|David Hume
6762|Politics: A Treatise on Government|Aristotle
8438|The Ethics of Aristotle|Aristotle
38427|The World as Will and Idea, Volume 1|Arthur Schopenhauer
5827|The Problems of Philosophy|Bertrand Russell
5116|Pragmatism|William James
621|The Varieties of Religious Experience|William James
3800|Ethics|Benedict de Spinoza
14328|The Consolation of Philosophy|Boethius
3296|The Confessions of St. Augustine|Saint Augustine
1727|The Odyssey|Homer
6130|The Iliad|Homer
1001|Divine Comedy, Longfellow's Translation, Hell|Dante Alighieri
8800|The Divine Comedy|Dante Alighieri
26|Paradise Lost|John Milton
58|Paradise Regained|John Milton
1041|Shakespeare's Sonnets|William Shakespeare
1514|A Midsummer Night's Dream|William Shakespeare
1531|Othello, the Moor of Venice|William Shakespeare
1532|The Tragedy of King Lear|William Shakespeare
23042|The Tempest|William Shakespeare
10|The King James Version of the Bible|Anonymous
7849|The Trial|Franz Kafka
829|Gulliver's Travels|Jonathan Swift
521|The Life and Adventures of Robinson Crusoe|Daniel Defoe
370|Moll Flanders|Daniel Defoe
730|Oliver Twist|Charles Dickens
766|David Copperfield|Charles Dickens
1023|Bleak House|Charles Dickens
580|The Pickwick Papers|Charles Dickens
786|Hard Times|Charles Dickens
963|Little Dorrit|Charles Dickens
917|Barnaby Rudge|Charles Dickens
700|The Old Curiosity Shop|Charles Dickens
883|Our Mutual Friend|Charles Dickens
564|The Mystery of Edwin Drood|Charles Dickens
967|Nicholas Nickleby|Charles Dickens
821|Dombey and Son|Charles Dickens
968|Martin Chuzzlewit|Charles Dickens
244|A Study in Scarlet|Arthur Conan Doyle
2097|The Sign of the Four|Arthur Conan Doyle
2852|The Hound of the Baskervilles|Arthur Conan Doyle
834|The Memoirs of Sherlock Holmes|Arthur Conan Doyle
108|The Return of Sherlock Holmes|Arthur Conan Doyle
3289|The Valley of Fear|Arthur Conan Doyle
2350|His Last Bow|Arthur Conan Doyle
139|The Lost World|Arthur Conan Doyle
12|Through the Looking-Glass|Lewis Carroll
13|The Hunting of the Snark|Lewis Carroll
55|The Wonderful Wizard of Oz|L. Frank Baum
54|The Marvelous Land of Oz|L. Frank Baum
45|Anne of Green Gables|L. M. Montgomery
47|Anne of Avonlea|L. M. Montgomery
51|Anne of the Island|L. M. Montgomery
113|The Secret Garden|Frances Hodgson Burnett
146|A Little Princess|Frances Hodgson Burnett
479|Little Lord Fauntleroy|Frances Hodgson Burnett
514|Little Women|Louisa May Alcott
2788|Little Men|Louisa May Alcott
3499|Jo's Boys|Louisa May Alcott
2787|An Old-Fashioned Girl|Louisa May Alcott
236|The Jungle Book|Rudyard Kipling
1937|The Second Jungle Book|Rudyard Kipling
2226|Kim|Rudyard Kipling
2781|Just So Stories|Rudyard Kipling
289|The Wind in the Willows|Kenneth Grahame
271|Black Beauty|Anna Sewell
1448|Heidi|Johanna Spyri
500|The Adventures of Pinocchio|Carlo Collodi
3836|Swiss Family Robinson|Johann David Wyss
26654|Peter and Wendy|J. M. Barrie
11757|The Velveteen Rabbit|Margery Williams
1874|The Railway Children|E. Nesbit
778|Five Children and It|E. Nesbit
770|The Story of the Treasure Seekers|E. Nesbit
498|Rebecca of Sunnybrook Farm|Kate Douglas Wiggin
1450|Pollyanna|Eleanor H. Porter
157|Daddy-Long-Legs|Jean Webster
10935|The Wonderful Adventures of Nils|Selma Lagerlof
14838|The Tale of Peter Rabbit|Beatrix Potter
67098|Winnie-the-Pooh|A. A. Milne
2591|Grimms' Fairy Tales|Jacob Grimm and Wilhelm Grimm
1597|Andersen's Fairy Tales|Hans Christian Andersen
27200|Fairy Tales of Hans Christian Andersen|Hans Christian Andersen
503|The Blue Fairy Book|Andrew Lang
21|Aesop's Fables|Aesop
128|The Arabian Nights Entertainments|Anonymous
19942|Candide|Voltaire
2147|The Works of Edgar Allan Poe, Volume 1|Edgar Allan Poe
2148|The Works of Edgar Allan Poe, Volume 2|Edgar Allan Poe
2151|The Works of Edgar Allan Poe, Volume 5|Edgar Allan Poe
932|The Fall of the House of Usher|Edgar Allan Poe
1064|The Masque of the Red Death|Edgar Allan Poe
1065|The Raven|Edgar Allan Poe
33|The Scarlet Letter|Nathaniel Hawthorne
77|The House of the Seven Gables|Nathaniel Hawthorne
41|The Legend of Sleepy Hollow|Washington Irving
2048|The Sketch-Book of Geoffrey Crayon|Washington Irving
1322|Leaves of Grass|Walt Whitman
3825|Pygmalion|George Bernard Shaw
3790|Major Barbara|George Bernard Shaw
3328|Man and Superman|George Bernard Shaw
969|The Tenant of Wildfell Hall|Anne Bronte
767|Agnes Grey|Anne Bronte
9182|Villette|Charlotte Bronte
145|Middlemarch|George Eliot
6688|The Mill on the Floss|George Eliot
550|Silas Marner|George Eliot
507|Adam Bede|George Eliot
7469|Daniel Deronda|George Eliot
24020|Romola|George Eliot
110|Tess of the d'Urbervilles|Thomas Hardy
27|Far from the Madding Crowd|Thomas Hardy
153|Jude the Obscure|Thomas Hardy
143|The Mayor of Casterbridge|Thomas Hardy
122|The Return of the Native|Thomas Hardy
209|The Turn of the Screw|Henry James
432|The Ambassadors|Henry James
2833|The Portrait of a Lady, Volume 1|Henry James
208|Daisy Miller|Henry James
211|The Aspern Papers|Henry James
2870|Washington Square|Henry James
541|The Age of Innocence|Edith Wharton
284|The House of Mirth|Edith Wharton
4517|Ethan Frome|Edith Wharton
160|The Awakening, and Selected Short Stories|Kate Chopin
24|O Pioneers!|Willa Cather
242|My Antonia|Willa Cather
203|Uncle Tom's Cabin|Harriet Beecher Stowe
23|Narrative of the Life of Frederick Douglass, an American Slave|Frederick Douglass
2376|Up from Slavery|Booker T. Washington
408|The Souls of Black Folk|W. E. B. Du Bois
11030|Incidents in the Life of a Slave Girl|Harriet Jacobs
15399|The Interesting Narrative of the Life of Olaudah Equiano|Olaudah Equiano
148|The Autobiography of Benjamin Franklin|Benjamin Franklin
140|The Jungle|Upton Sinclair
215|The Call of the Wild|Jack London
910|White Fang|Jack London
1056|Martin Eden|Jack London
1074|The Sea-Wolf|Jack London
3176|The Innocents Abroad|Mark Twain
86|A Connecticut Yankee in King Arthur's Court|Mark Twain
119|A Tramp Abroad|Mark Twain
245|Life on the Mississippi|Mark Twain
102|The Tragedy of Pudd'nhead Wilson|Mark Twain
1837|The Prince and the Pauper|Mark Twain
3177|Roughing It|Mark Twain
2759|The Man in the Iron Mask|Alexandre Dumas
1259|Twenty Years After|Alexandre Dumas
2500|Siddhartha|Hermann Hesse
1934|Songs of Innocence and Songs of Experience|William Blake
574|Poems of William Blake|William Blake
12242|Poems by Emily Dickinson, Three Series, Complete|Emily Dickinson
4800|The Complete Poetical Works of Percy Bysshe Shelley|Percy Bysshe Shelley
151|The Rime of the Ancient Mariner|Samuel Taylor Coleridge
23684|Keats: Poems Published in 1820|John Keats
21700|Don Juan|Lord Byron
8601|The Early Poems of Alfred, Lord Tennyson|Alfred Tennyson
610|Idylls of the King|Alfred Tennyson
2002|Sonnets from the Portuguese|Elizabeth Barrett Browning
1321|The Waste Land|T. S. Eliot
3021|A Boy's Will|Robert Frost
3026|North of Boston|Robert Frost
1251|Le Morte d'Arthur, Volume 1|Thomas Malory
2383|The Canterbury Tales and Other Poems|Geoffrey Chaucer
16328|Beowulf: An Anglo-Saxon Epic Poem|Anonymous
3726|The Decameron, Volume I|Giovanni Boccaccio
1200|Gargantua and Pantagruel|Francois Rabelais
1404|The Federalist Papers|Alexander Hamilton, John Jay and James Madison
147|Common Sense|Thomas Paine
3742|The Writings of Thomas Paine, Volume 2: The Rights of Man|Thomas Paine
3420|A Vindication of the Rights of Woman|Mary Wollstonecraft
815|Democracy in America, Volume 1|Alexis de Tocqueville
1946|On War, Volume 1|Carl von Clausewitz
2130|Utopia|Thomas More
6400|The Lives of the Twelve Caesars|Suetonius
674|Lives of the Noble Grecians and Romans|Plutarch
7142|The History of the Peloponnesian War|Thucydides
2707|The History of Herodotus, Volume 1|Herodotus
31|Plays of Sophocles: Oedipus the King; Oedipus at Colonus; Antigone|Sophocles
8714|Four Plays of Aeschylus|Aeschylus
7700|Lysistrata|Aristophanes
14020|The Works of Horace|Horace
21765|The Metamorphoses of Ovid, Books I-VII|Ovid
3330|The Analects of Confucius|Confucius
2388|The Song Celestial, or Bhagavad-Gita|Anonymous
2017|Dhammapada|Anonymous
3283|The Upanishads|Anonymous
3623|The Golden Bough|James George Frazer
689|The Kreutzer Sonata and Other Stories|Leo Tolstoy
243|The Forged Coupon and Other Stories|Leo Tolstoy
1081|Dead Souls|Nikolai Gogol
47935|Fathers and Sons|Ivan Turgenev
7986|Plays by Anton Chekhov, Second Series|Anton Chekhov
4093|Hedda Gabler|Henrik Ibsen
2467|Ghosts|Henrik Ibsen
2446|An Enemy of the People|Henrik Ibsen
779|The Tragical History of Doctor Faustus|Christopher Marlowe
3023|Faust, Part 1|Johann Wolfgang von Goethe
2027|Tartuffe, or The Hypocrite|Moliere
1254|Cyrano de Bergerac|Edmond Rostand
5711|Germinal|Emile Zola
5250|Nana|Emile Zola
44747|The Red and the Black|Stendhal
11049|Eugenie Grandet|Honore de Balzac
3090|Complete Original Short Stories of Guy de Maupassant|Guy de Maupassant
7178|Swann's Way|Marcel Proust
18247|The Last Man|Mary Wollstonecraft Shelley
42324|Frankenstein; Or, The Modern Prometheus (1818 text)|Mary Wollstonecraft Shelley
42|The Strange Case of Dr. Jekyll and Mr. Hyde (another edition)|Robert Louis Stevenson
421|Kidnapped|Robert Louis Stevenson
848|The Black Arrow|Robert Louis Stevenson
60|The Scarlet Pimpernel|Baroness Orczy
95|The Prisoner of Zenda|Anthony Hope
2166|King Solomon's Mines|H. Rider Haggard
3155|She|H. Rider Haggard
558|The Thirty-Nine Steps|John Buchan
2360|The Riddle of the Sands|Erskine Childers
82|Ivanhoe|Walter Scott
2034|Waverley|Walter Scott
7025|Rob Roy|Walter Scott
940|The Last of the Mohicans|James Fenimore Cooper
840|Lorna Doone|R. D. Blackmore
1480|Tom Brown's School Days|Thomas Hughes
175|The Phantom of the Opera|Gaston Leroux
1695|The Man Who Was Thursday|G. K. Chesterton
204|The Innocence of Father Brown|G. K. Chesterton
155|The Moonstone|Wilkie Collins
583|The Woman in White|Wilkie Collins
1626|After Dark|Wilkie Collins
375|An Occurrence at Owl Creek Bridge|Ambrose Bierce
972|The Devil's Dictionary|Ambrose Bierce
1155|The Secret Adversary|Agatha Christie
863|The Mysterious Affair at Styles|Agatha Christie
61262|Poirot Investigates|Agatha Christie
58585|The Prophet|Kahlil Gibran
10007|Carmilla|J. Sheridan Le Fanu
696|The Castle of Otranto|Horace Walpole
3268|The Mysteries of Udolpho|Ann Radcliffe
8486|Ghost Stories of an Antiquary|M. R. James
8492|The King in Yellow|Robert W. Chambers
31469|The Shunned House|H. P. Lovecraft
1640|Lilith|George MacDonald
599|Vanity Fair|William Makepeace Thackeray
2432|Barchester Towers|Anthony Trollope
619|The Warden|Anthony Trollope
5231|The Way We Live Now|Anthony Trollope
4276|North and South|Elizabeth Gaskell
394|Cranford|Elizabeth Gaskell
1906|Erewhon|Samuel Butler
2084|The Way of All Flesh|Samuel Butler
2160|The Expedition of Humphry Clinker|Tobias Smollett
4085|The Adventures of Roderick Random|Tobias Smollett
6593|History of Tom Jones, a Foundling|Henry Fielding
1079|The Life and Opinions of Tristram Shandy, Gentleman|Laurence Sterne
308|Three Men in a Boat|Jerome K. Jerome
1026|The Diary of a Nobody|George Grossmith and Weedon Grossmith
902|The Happy Prince, and Other Tales|Oscar Wilde
885|An Ideal Husband|Oscar Wilde
790|Lady Windermere's Fan|Oscar Wilde
1338|Selected Prose of Oscar Wilde|Oscar Wilde
1013|The First Men in the Moon|H. G. Wells
775|When the Sleeper Wakes|H. G. Wells
780|The War in the Air|H. G. Wells
62|A Princess of Mars|Edgar Rice Burroughs
64|The Gods of Mars|Edgar Rice Burroughs
1153|The Chessmen of Mars|Edgar Rice Burroughs
78|Tarzan of the Apes|Edgar Rice Burroughs
81|The Return of Tarzan|Edgar Rice Burroughs
32|Herland|Charlotte Perkins Gilman
73|The Red Badge of Courage|Stephen Crane
165|McTeague|Frank Norris
233|Sister Carrie|Theodore Dreiser
543|Main Street|Sinclair Lewis
1156|Babbitt|Sinclair Lewis
805|This Side of Paradise|F. Scott Fitzgerald
9830|The Beautiful and Damned|F. Scott Fitzgerald
67138|The Sun Also Rises|Ernest Hemingway
217|Sons and Lovers|D. H. Lawrence
4240|Women in Love|D. H. Lawrence
28948|The Rainbow|D. H. Lawrence
351|Of Human Bondage|W. Somerset Maugham
222|The Moon and Sixpence|W. Somerset Maugham
2641|A Room with a View|E. M. Forster
2891|Howards End|E. M. Forster
144|The Voyage Out|Virginia Woolf
1245|Night and Day|Virginia Woolf
5670|Jacob's Room|Virginia Woolf
63107|Mrs. Dalloway in Bond Street|Virginia Woolf
11231|Bartleby, the Scrivener|Herman Melville
1900|Typee|Herman Melville
15859|The Piazza Tales|Herman Melville
5348|Ragged Dick|Horatio Alger
17135|'Twas the Night before Christmas|Clement Clarke Moore
15489|Dream Psychology|Sigmund Freud
38219|A General Introduction to Psychoanalysis|Sigmund Freud
30155|Relativity: The Special and General Theory|Albert Einstein
33283|Calculus Made Easy|Silvanus P. Thompson
201|Flatland: A Romance of Many Dimensions|Edwin A. Abbott
"""


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    repos = {}
    with open(sys.argv[1], newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            repos[int(row[0])] = row[1]
    books, seen = [], set()
    for line in PICKS.strip().splitlines():
        book_id, title, author = line.split("|")
        book_id = int(book_id)
        if book_id in seen:
            sys.exit(f"book {book_id} is listed twice")
        if book_id not in repos:
            sys.exit(f"book {book_id} ({title}) has no GITenberg repository")
        if not repos[book_id].endswith(f"_{book_id}"):
            sys.exit(f"book {book_id}: repository name {repos[book_id]} does not end with its id")
        seen.add(book_id)
        books.append([book_id, title, author, repos[book_id]])
    head = {
        "about": "Popular Project Gutenberg books on the GITenberg mirror: [id, title, author, repository]. "
                 "Raw files: url with {repo} and a name from files ({id} filled in), tried in order. "
                 "Rebuilt by build/make_catalogue.py from gitenberg-dev/gitberg's GITenberg_repo_list.tsv.",
        "url": "https://raw.githubusercontent.com/GITenberg/{repo}/master/{file}",
        "files": ["{id}-0.txt", "{id}.txt", "{id}-8.txt", "{id}-h/{id}-h.htm"],
    }
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "books": [']
    lines += [" " + json.dumps(b, ensure_ascii=False) + "," for b in books]
    lines[-1] = lines[-1][:-1]
    OUT.write_text("\n".join(lines) + "\n]}\n", encoding="utf-8")
    print(f"{len(books)} books -> {OUT}")


if __name__ == "__main__":
    main()
