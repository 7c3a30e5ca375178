"""
A real text-embedding model that needs no download (protocol "jsonl", aibackend.worker):
latent semantic analysis, fitted at load on the sentences below (they ship with it). TF-IDF
over words and over the letters inside words (so that a word it never saw still lands near
the words it resembles), then a truncated SVD to 64 dimensions; every vector is L2-normalised,
so that the dot product of two is their cosine similarity. Texts on one subject come out
closer than texts on different ones.

Through the OpenAI-compatible API: client.embeddings.create(model="embed", input=["..."]).
Through /post/predict, with the body that API sends it (README "Chat models"):

    curl -s -d '{"input": ["the cat sleeps", "a dog barks"], "dimensions": 4}' \\
         'http://127.0.0.1:8080/post/predict?id=embed'
    # {"embeddings": [[0.566, -0.004, 0.444, -0.695], [0.379, -0.197, -0.901, -0.070]],
    #  "usage": {"prompt_tokens": 6, "total_tokens": 6}}

Input: {"input": [text, ...]} (a single string is taken as a list of one; 1 to 2048 texts,
none empty), "dimensions" (1 to 64: the first components, those that carry the most, the
vector normalised again) optional; other parameters (user, encoding_format: the API's front
door encodes the floats) are accepted and have no effect. prompt_tokens counts the texts'
words and punctuation marks (aibackend.worker.count_tokens). A text that shares not one
word or letter group with the sentences below has no direction here: its vector is all zeros.
"""

import numpy
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import make_union

from aibackend.worker import BadInput, count_tokens, log, serve

DIMENSIONS = 64
MAX_INPUTS = 2048

# What the model learns from: short sentences on a dozen subjects, eight or so each.
CORPUS = """
The cat sleeps on the warm windowsill all afternoon.
A kitten chases a ball of yarn across the floor.
Our dog barks at the mail carrier every morning.
The puppy wags its tail when the children come home.
Cats and dogs are the most common pets in the house.
The veterinarian checked the sick dog and gave it medicine.
A parrot can learn to repeat words it hears often.
The hamster runs on its wheel at night.
Feed the pets twice a day and give them fresh water.
Heavy rain is expected tomorrow with strong winds from the west.
The weather forecast says it will be sunny and warm this weekend.
Snow fell overnight and the roads are covered in ice.
A thunderstorm brought lightning and hail to the city.
The temperature dropped below freezing after the cold front passed.
Clouds gathered in the afternoon and a light drizzle began.
The summer heat wave broke records across the region.
Fog made it hard to see the road early in the morning.
Simmer the tomato sauce with garlic and fresh basil.
Bake the bread in a hot oven until the crust is golden.
Whisk the eggs with sugar and butter to make the cake batter.
The soup needs more salt, pepper and a little lemon juice.
Chop the onions and fry them slowly in olive oil.
The recipe calls for flour, milk and two eggs.
Grill the fish and serve it with rice and vegetables.
She cooked a pasta dinner with cheese and mushrooms.
The team scored a goal in the last minute of the football match.
The tennis player won the final in three sets.
Runners trained for months before the city marathon.
The basketball coach called a timeout to plan the next play.
Fans cheered as the striker kicked the ball into the net.
The swimmer broke the world record in the pool.
Our football club won the league after a long season.
The referee showed a red card and the player left the field.
The program crashed because of a bug in the parser.
Install the package with pip and run the tests.
The server answers requests over HTTP and logs every error.
A compiler turns source code into a program the computer can run.
The database stores each record with a unique key.
Restart the daemon after you change the configuration file.
The function returns a list of strings sorted by length.
Memory leaks make a long-running process slow down over time.
The network connection timed out while the client waited for the server.
The orchestra played a symphony by Beethoven last night.
She practices the piano for an hour every evening.
The band released a new album of rock songs.
A violin and a cello played a quiet duet.
The singer's voice filled the concert hall.
He learned to play guitar chords from online lessons.
The choir sang carols in the church at Christmas.
Music with a strong drum beat makes people dance.
The stock market fell sharply after the bank raised interest rates.
Investors bought shares of the company as profits grew.
Inflation pushed prices up and wages did not keep pace.
The central bank kept interest rates unchanged this quarter.
The company reported higher revenue and a record profit.
Bond yields rose as the economy slowed.
A loan from the bank helped the family buy a house.
The government cut taxes to help small businesses.
The train to the capital leaves from platform four.
We flew to the island and stayed in a small hotel by the beach.
Pack your passport and tickets before the trip.
The flight was delayed for two hours by the storm.
Tourists visited the old castle and the museum.
They drove across the mountains on a long road trip.
The ferry crossed the sea to the harbour in an hour.
Book the hotel early because the city is busy in summer.
The doctor said regular exercise keeps the heart healthy.
A fever and a cough are common symptoms of the flu.
The nurse gave the patient an injection in the hospital.
Eating fruit and vegetables is good for your health.
The surgeon operated on the broken leg.
Sleep well and drink water to recover from the illness.
The vaccine protects children against the disease.
The pharmacist explained how to take the medicine.
The farmer planted wheat and corn in the spring.
Apples ripen on the trees in the orchard in autumn.
The garden needs water and sunlight for the flowers to grow.
Cows graze in the green field beside the barn.
Tomatoes and potatoes grow well in rich soil.
Bees carry pollen from flower to flower.
The harvest was good after a warm and wet summer.
Pull the weeds before they choke the young plants.
The telescope showed the rings of Saturn and the moons of Jupiter.
The rocket launched the satellite into orbit around the earth.
Astronauts lived for six months on the space station.
A comet passed close to the sun and grew a bright tail.
The stars and galaxies are billions of light years away.
The moon circles the earth once a month.
Scientists found water ice on the surface of Mars.
A solar eclipse darkened the sky at noon.
"""


class Embedder:
    def load(self):
        sentences = [line.strip() for line in CORPUS.strip().splitlines() if line.strip()]
        self.tfidf = make_union(
            TfidfVectorizer(sublinear_tf=True, stop_words="english"),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True),
        )
        features = self.tfidf.fit_transform(sentences)
        self.svd = TruncatedSVD(n_components=DIMENSIONS, random_state=0).fit(features)
        log(f"fitted on {len(sentences)} sentences: {features.shape[1]} features, {DIMENSIONS} dimensions")

    def predict(self, data):
        if not isinstance(data, dict) or "input" not in data:
            raise BadInput('send {"input": ["text", ...]}')
        texts = data["input"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_INPUTS:
            raise BadInput(f"input must be a string or a list of 1 to {MAX_INPUTS} strings")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadInput(f"input[{i}] must be a string (this model takes text, not token ids)")
            if not text.strip():
                raise BadInput(f"input[{i}] is empty")
        dimensions = data.get("dimensions")
        if dimensions is None:
            dimensions = DIMENSIONS
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= DIMENSIONS:
            raise BadInput(f"dimensions must be a whole number from 1 to {DIMENSIONS} (this model's size)")
        vectors = self.svd.transform(self.tfidf.transform(texts))[:, :dimensions]
        norms = numpy.linalg.norm(vectors, axis=1, keepdims=True)
        # A text sharing nothing with the corpus has no direction: it stays the zero vector.
        vectors = numpy.divide(vectors, norms, out=numpy.zeros_like(vectors), where=norms > 0)
        tokens = sum(count_tokens(text) for text in texts)
        return {"embeddings": vectors.astype(float), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


if __name__ == "__main__":
    serve(Embedder(), concurrency=2)
